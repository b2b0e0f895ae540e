"""The Python client installs without torch, kopf and kubernetes: the project's base install (no extras) in a
fresh venv without the system's packages, then ``lipsync client`` and ``LipSyncClient`` against a real pod
on loopback, started from this (the full) environment."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from serving_support import LOOPBACK, ServerThread, models_dir_with

from inference_pod.serving.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# What a build needs (the same list docker/inference.Dockerfile copies); generated stubs are rebuilt.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "proto", "inference_pod", "operator")

CALL = """
import json, sys
from inference_pod.client import LipSyncClient, decode_frame
with LipSyncClient(sys.argv[1]) as client:
    image = decode_frame(client.generate_frame("demo", 3))
print(json.dumps({"shape": list(image.shape), "heavy": [m for m in ("torch", "kopf", "kubernetes") if m in sys.modules]}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("client-install")
    source = work / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", str(source)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env_dir


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_client_installs_and_runs_without_torch_kopf_or_kubernetes(client_venv, tmp_path):
    python = str(client_venv / "bin" / "python")
    absent = subprocess.run([python, "-c", "import importlib.util as u; "
                             "print([m for m in ('torch', 'kopf', 'kubernetes') if u.find_spec(m)])"],
                            capture_output=True, text=True, timeout=60)
    assert absent.stdout.strip() == "[]", absent.stderr  # installed without them at all
    server = ServerThread(Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=0,
                                   models_dir=models_dir_with(tmp_path / "models", "demo-1"), encode_threads=1))
    try:
        models = subprocess.run([str(client_venv / "bin" / "lipsync"), "client", "--target", server.target, "models"],
                                capture_output=True, text=True, timeout=120)
        assert models.returncode == 0, models.stderr
        assert [m["name"] for m in json.loads(models.stdout)] == ["demo"]
        call = subprocess.run([python, "-c", CALL, server.target], capture_output=True, text=True, timeout=120)
        assert call.returncode == 0, call.stderr
        assert json.loads(call.stdout) == {"shape": [48, 48, 3], "heavy": []}
    finally:
        server.close()

