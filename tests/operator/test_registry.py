"""The operator's package check against real registries served over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest
from lsm_harness import Registry, free_port

from lipsync_operator.egress import RegistryPolicy
from lipsync_operator.registry import check_package, version_key

LOCAL = RegistryPolicy(["127.0.0.1"])   # the test registries: loopback, allowed by name


def test_versions_order_naturally():
    versions = ["1.9", "1.10", "1.0-rc1", "1.0.1", "1.0", "2", "0.9.9", "1.0-rc2"]
    assert sorted(versions, key=version_key) == ["0.9.9", "1.0-rc1", "1.0-rc2", "1.0", "1.0.1", "1.9", "1.10", "2"]


def test_unpinned_resolves_the_newest_version(registry):
    registry.add("alice", "1.10.0")
    check = check_package({"name": "alice"}, policy=LOCAL, default_registry=registry.url)
    assert check.available and check.reason == "Verified"
    assert (check.version, check.registry) == ("1.10.0", registry.url)
    assert check.url == f"{registry.url}alice/1.10.0/alice-1.10.0.zip"
    assert (check.sha256, check.size) == (registry.packages[-1]["sha256"], registry.packages[-1]["size"])


def test_pinned_version_and_matching_sha256(registry):
    sha = next(p["sha256"] for p in registry.packages if p["version"] == "1.0.0")
    check = check_package({"name": "alice", "version": "1.0.0", "sha256": sha, "registry": registry.url.rstrip("/")},
                          policy=LOCAL, default_registry="")
    assert check.available and check.version == "1.0.0" and check.sha256 == sha


@pytest.mark.parametrize("package, reason", [
    ({"name": "zed"}, "PackageNotFound"),
    ({"name": "alice", "version": "7"}, "VersionNotFound"),
    ({"name": "alice", "version": "1.0.0", "sha256": "0" * 64}, "ChecksumMismatch"),
])
def test_what_the_index_does_not_have(registry, package, reason):
    check = check_package(package, policy=LOCAL, default_registry=registry.url)
    assert not check.available and check.reason == reason, check


def test_a_listed_file_that_is_missing_or_different(registry):
    (registry.root / "bob/3/bob-3.zip").unlink()
    assert check_package({"name": "bob"}, policy=LOCAL, default_registry=registry.url).reason == "PackageFileMissing"
    (registry.root / "alice/1.2.0/alice-1.2.0.zip").write_bytes(b"truncated")
    assert check_package({"name": "alice"}, policy=LOCAL, default_registry=registry.url).reason == "SizeMismatch"


def test_unreachable_missing_and_broken_registries(registry, tmp_path):
    port = free_port()
    check = check_package({"name": "alice"}, policy=LOCAL, default_registry=f"http://127.0.0.1:{port}/", timeout=2)
    assert check.reason == "RegistryUnreachable" and f"127.0.0.1:{port}" in check.message
    assert check_package({"name": "alice"}, policy=LOCAL, default_registry=registry.url + "elsewhere/").reason == "IndexNotFound"
    (registry.root / "index.json").write_text('{"packages": [{"name": "alice"}]}')
    assert check_package({"name": "alice"}, policy=LOCAL, default_registry=registry.url).reason == "InvalidIndex"
    assert check_package({"name": "alice"}, policy=LOCAL, default_registry="").reason == "NoRegistry"
    registry.fail_index = 1
    assert check_package({"name": "alice"}, policy=LOCAL, default_registry=registry.url).reason == "RegistryError"


def test_uri_is_resolved_through_the_enclosing_registry_index(registry):
    uri = f"{registry.url}alice/1.0.0/alice-1.0.0.zip"
    check = check_package({"name": "alice", "uri": uri}, policy=LOCAL, default_registry="http://unused.invalid/")
    assert check.available, check
    assert (check.registry, check.version, check.url) == (registry.url, "1.0.0", uri)
    assert check_package({"name": "bob", "uri": uri}, policy=LOCAL, default_registry="").reason == "PackageNotFound"
    missing = f"{registry.url}alice/9/alice-9.zip"
    assert check_package({"name": "alice", "uri": missing}, policy=LOCAL, default_registry="").reason == "PackageNotFound"


def test_the_pull_secret_token_is_sent(tmp_path):
    payload = b"secret package"
    index = {"packages": [{"name": "priv", "version": "1", "size": len(payload),
                           "sha256": hashlib.sha256(payload).hexdigest(), "url": "priv-1.zip"}]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _serve(self, body: bool):
            if self.headers.get("Authorization") != "Bearer s3cret":
                self.send_error(401)
                return
            data = json.dumps(index).encode() if self.path == "/index.json" else payload
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_GET(self):
            self._serve(True)

        def do_HEAD(self):
            self._serve(False)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        assert check_package({"name": "priv"}, policy=LOCAL, default_registry=url).reason == "RegistryForbidden"
        assert check_package({"name": "priv"}, policy=LOCAL, default_registry=url, token="s3cret").available
    finally:
        server.shutdown()
        server.server_close()


def test_reads_an_index_published_by_the_pod_tooling(tmp_path, demo_package):
    """Contract with inference_pod.serving.registry: what `lipsync package publish` writes, the operator reads."""
    from inference_pod.serving.registry import publish
    reg = Registry(tmp_path / "published")
    reg.root.mkdir()
    entry = publish(demo_package, reg.root)
    reg.start()
    try:
        check = check_package({"name": entry.name}, policy=LOCAL, default_registry=reg.url)
        assert check.available, check
        assert (check.version, check.sha256, check.size) == (entry.version, entry.sha256, entry.size)
    finally:
        reg.stop()


@pytest.mark.parametrize("name, version", [("../../escape", "1"), ("Alice", "1"), ("alice", "1/../2"), ("", "1")])
def test_the_pod_and_the_operator_refuse_the_same_invalid_names(registry, tmp_path, name, version):
    """One index reader (inference_pod.registry_index) for both: the same index gets the same verdict."""
    from inference_pod.errors import Unavailable
    from inference_pod.serving.registry import RegistryClient

    registry.add("alice", "1.0.0")
    hostile = {"name": name, "version": version, "size": 1, "sha256": "0" * 64, "url": "x.zip"}
    (registry.root / "index.json").write_text(json.dumps({"packages": [*registry.packages, hostile]}))
    check = check_package({"name": "alice"}, policy=LOCAL, default_registry=registry.url)
    assert (check.available, check.reason) == (False, "InvalidIndex") and "invalid name or version" in check.message
    with pytest.raises(Unavailable, match="invalid name or version") as pod:
        RegistryClient(registry.url).list()
    assert str(pod.value).split(": ", 1)[1] == check.message.split(": ", 1)[1]


_BLOCK_HEAVY = r"""
import sys

class Refuse:
    HEAVY = {"torch", "numpy", "cv2", "soundfile", "soxr", "PIL", "redis"}  # the pod's stack (grpc is in both)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.HEAVY:
            raise ImportError(f"{name} is not in the operator image")
        return None

sys.meta_path.insert(0, Refuse())
import inference_pod
import lipsync_operator.handlers
from lipsync_operator.egress import RegistryPolicy
from lipsync_operator.registry import check_package

LOCAL = RegistryPolicy(["127.0.0.1"])
print(inference_pod.__file__)
try:
    import inference_pod.package
except ImportError as exc:
    print("package:", exc)
check = check_package({"name": "alice"}, policy=LOCAL, default_registry=sys.argv[1])
print(check.reason, check.version)
"""


def test_the_operator_imports_without_torch_from_what_its_image_copies(registry, tmp_path):
    """The operator image holds only what operator.Dockerfile copies: lipsync_operator and, of the pod,
    inference_pod/__init__.py and registry_index.py. Run from exactly that, with the inference stack refused."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    app = tmp_path / "app"
    dockerfile = (root / "docker" / "operator.Dockerfile").read_text()
    for sources, dest in re.findall(r"^COPY (?!--from)(.+) (/app/\S*)$", dockerfile, re.M):
        for source in sources.split():
            target = app / dest.removeprefix("/app/")
            if (root / source).is_dir():
                shutil.copytree(root / source, target)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(root / source, target)
    assert sorted(p.name for p in (app / "inference_pod").iterdir()) == ["__init__.py", "registry_index.py"]
    # the image's stubs stage generates lipsync/v1 from proto/; here they are the ones setup.py generated
    assert "COPY --from=stubs /out/lipsync /app/lipsync" in dockerfile
    shutil.copytree(root / "proto" / "lipsync", app / "lipsync", ignore=shutil.ignore_patterns("*.proto", "*.pyi"))
    registry.add("alice", "2.0")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(app)}
    proc = subprocess.run([sys.executable, "-c", _BLOCK_HEAVY, registry.url], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    where, package, verdict = proc.stdout.strip().splitlines()
    assert where == str(app / "inference_pod" / "__init__.py")
    assert package.startswith("package:")  # the inference stack is not there, and nothing needed it
    assert verdict == "Verified 2.0"
