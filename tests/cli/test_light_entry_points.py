"""The entry points that must start fast start without torch, kopf or kubernetes: ``lipsync --help``, the
init container's ``lipsync package fetch`` and ``lipsync client ...``. Each runs in a fresh interpreter,
which then reports what it imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serving_support import StaticRegistry, package

from inference_pod.serving.registry import publish

HEAVY = ("torch", "kopf", "kubernetes")
REPORT = "IMPORTED:"

RUN = f"""
import json, sys
from inference_pod.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # --help exits
    code = exc.code
print({REPORT!r} + json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def run_lipsync(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith(REPORT))
    return json.loads(line[len(REPORT):])


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["package", "fetch", "--help"],
    ["client", "--help"],
    ["client", "frame", "--help"],
    ["client", "stream", "--help"],
], ids=" ".join)
def test_help_imports_no_torch_kopf_or_kubernetes(argv):
    assert run_lipsync(argv) == {"code": 0, "heavy": []}


def test_package_fetch_imports_no_torch_kopf_or_kubernetes(tmp_path):
    publish(package("demo-1"), tmp_path / "registry")
    registry = StaticRegistry(tmp_path / "registry")
    try:
        report = run_lipsync(["package", "fetch", "demo", "--registry", registry.url, "--out", str(tmp_path / "out")])
    finally:
        registry.close()
    assert report == {"code": 0, "heavy": []}
    assert (tmp_path / "out" / "demo-1.zip").is_file()  # it did fetch: the import check covered real work
