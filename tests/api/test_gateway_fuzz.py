"""Schemathesis, the current release, run as its users run it (``schemathesis run URL/openapi.json --checks all``,
examples, coverage and fuzzing phases, the repository's schemathesis.toml) against a running pod's own
/openapi.json, with API keys on and off: generated requests, valid and invalid, get the statuses and bodies
the document declares and never a server error; requests the schema refuses are refused, requests it
accepts are accepted. Seeded and bounded (``-n``), so a run is repeatable and takes about a minute.

schemathesis.toml holds the two allowances, with their reasons: /ws is a WebSocket handshake (101), which an
HTTP fuzzer cannot follow, and a schema-valid frame request may still get 400 (audio that does not decode, a
frame past the track).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serving_support import LOOPBACK, ServerThread, StaticRegistry, free_port, models_dir_with, package

from inference_pod.serving.registry import publish
from inference_pod.serving.settings import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "fuzz-key"
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_PER_OPERATION = 40
SEED = 20261207


def start_pod(root, **overrides) -> ServerThread:
    models = models_dir_with(root / "models", "demo-1")
    return ServerThread(Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models,
                                 max_batch=8, max_batch_delay_ms=5, encode_threads=2, max_message_mb=1,
                                 preload=["demo"], **overrides))


def schemathesis_run(pod: ServerThread, *options: str) -> None:
    """``schemathesis run`` with every check; fails with schemathesis's own report of what it found."""
    url = f"http://{LOOPBACK}:{pod.server.gateway.port}/openapi.json"
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "schemathesis.toml"), "--no-color",
               "run", url, "--checks", "all", "--phases", "examples,coverage,fuzzing", "--continue-on-failure",
               "-n", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--workers", "1", *options]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert pod.server.data_plane.state() == "healthy"


def test_pod_without_keys_conforms_to_its_document(tmp_path):
    """No keys and no registry: /models/registry and /models/download answer 409."""
    pod = start_pod(tmp_path)
    try:
        schemathesis_run(pod)
    finally:
        pod.close()


def test_pod_with_keys_conforms_to_its_document(tmp_path):
    """API keys (a per-model health needs one too) and a registry holding another model."""
    publish(package("other-1"), tmp_path / "registry")
    registry = StaticRegistry(tmp_path / "registry")
    (tmp_path / "keys").write_text(f"{KEY}\n")
    pod = start_pod(tmp_path, api_keys_file=tmp_path / "keys", health_requires_key=True, registry_url=registry.url)
    try:
        schemathesis_run(pod, "--header", f"X-API-Key: {KEY}")
    finally:
        pod.close()
        registry.close()
