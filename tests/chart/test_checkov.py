"""checkov's Kubernetes policies on the manifests the Helm library renders: every failed check must be in
the allow-list of docs/KUBERNETES.md (check id and why it stays), and every entry there must still fail
somewhere, so the list and the chart cannot drift apart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chart_support import ROOT, render_files

DOCS = ROOT / "docs" / "KUBERNETES.md"
DIGEST = "sha256:" + "ab" * 32
CONFIGS = {
    "defaults": None,
    "redis": {"redis": {"enabled": True}},
    "namespace-scope": {"redis": {"enabled": True}, "rbac": {"scope": "namespace"},
                        "operator": {"watchNamespaces": ["studio", "staging"]}},
    "digests": {"operator": {"image": {"digest": DIGEST}},
                "inference": {"image": {"digest": DIGEST}}, "redis": {"enabled": True, "image": {"digest": DIGEST}},
                "tests": {"image": {"digest": DIGEST}}},
}


def allow_list() -> dict[str, str]:
    """check id -> reason, from the table between the checkov-allow-list markers."""
    text = DOCS.read_text()
    start, end = text.index("<!-- checkov-allow-list"), text.index("<!-- end checkov-allow-list -->")
    rows = re.findall(r"^\| (CKV2?_K8S_\d+) \| (.+) \|$", text[start:end], re.M)
    assert rows, "no allow-list rows found in docs/KUBERNETES.md"
    return dict(rows)


def checkov() -> list[str]:
    found = shutil.which("checkov") or shutil.which("checkov", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("checkov is not installed: pip install -e '.[test]'")
    return [found]


@pytest.fixture(scope="module")
def failures(chart, tmp_path_factory) -> dict[str, list[dict]]:
    """config name -> checkov's failed checks; one checkov run over every configuration's manifests."""
    root = tmp_path_factory.mktemp("rendered")
    for name, values in CONFIGS.items():
        for path, text in render_files(chart, values).items():
            if not path.endswith("NOTES.txt"):
                target = root / name / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    proc = subprocess.run([*checkov(), "-d", str(root), "--framework", "kubernetes", "-o", "json", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]   # 1: some check failed
    report = json.loads(proc.stdout)
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    assert report["summary"]["passed"] > 100, report["summary"]   # it really checked the manifests
    out: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for check in report["results"]["failed_checks"]:
        out[Path(check["file_path"]).parts[1]].append(check)
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_every_failed_check_is_in_the_documented_allow_list(failures, config):
    allowed = allow_list()
    unexplained = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in failures[config]
                   if c["check_id"] not in allowed]
    assert not unexplained, "fix these or add them with a reason to docs/KUBERNETES.md:\n" + "\n".join(unexplained)


def test_every_allow_list_entry_is_still_needed(failures):
    failing = {c["check_id"] for checks in failures.values() for c in checks}
    assert not set(allow_list()) - failing, "no longer failing: remove from docs/KUBERNETES.md"


def test_what_the_chart_fixed_stays_fixed(failures):
    """The checks the chart once failed and now passes: CPU limits, a high UID for Redis, NetworkPolicies
    for every pod, digests when given."""
    for config, checks in failures.items():
        ids = {c["check_id"] for c in checks}
        assert not ids & {"CKV_K8S_11", "CKV_K8S_40", "CKV2_K8S_6"}, (config, ids)
    # Digests pin every image; the pull policy then no longer matters to checkov either.
    assert {"CKV_K8S_43", "CKV_K8S_15"} <= {c["check_id"] for c in failures["defaults"]}
    assert not {"CKV_K8S_43", "CKV_K8S_15"} & {c["check_id"] for c in failures["digests"]}
