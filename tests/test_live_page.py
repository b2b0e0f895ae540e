"""The live page at / of a real pod: its files over HTTP, and (when Chromium is installed) a headless browser
that speaks into a fake microphone and watches the trained demo answer."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serving_support import LOOPBACK, ServerThread, free_port, models_dir_with

from inference_pod.gateway_web import WEB_FILES
from inference_pod.settings import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "page-key"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _settings(models: Path, keys: Path) -> Settings:
    return Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models, max_batch=8,
                    max_batch_delay_ms=20, encode_threads=2, shutdown_grace_s=5, api_keys_file=keys)


def _get(url: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page-keys") / "keys"
    path.write_text(f"{KEY}\n")
    return path


def test_page_and_its_files_are_served_without_third_party_scripts(tmp_path, keys_file):
    pod = ServerThread(_settings(models_dir_with(tmp_path / "models", "demo-1"), keys_file))
    base = f"http://{LOOPBACK}:{pod.server.gateway.port}"
    try:
        status, kind, body = _get(base + "/")
        assert status == 200 and kind.startswith("text/html")
        html = body.decode()
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("web/") for s in sources), sources  # nothing from another origin
        for name, content_type in WEB_FILES.items():
            status, kind, body = _get(f"{base}/web/{name}")
            assert status == 200 and kind.startswith(content_type) and body, name
        for path in ("/web/gateway.py", "/web/..%2Fgateway.py", "/web/"):
            assert _get(base + path)[0] == 404, path
        # The page is public; what it calls is not.
        assert _get(base + "/models")[0] == 401
        assert _get(base + "/models", {"X-API-Key": KEY})[0] == 200
    finally:
        pod.close()
