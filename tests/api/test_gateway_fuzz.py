"""Schemathesis against a running pod's own /openapi.json, with API keys on and off: generated requests, valid
and invalid, get the statuses and bodies the document declares, never a server error; requests the schema
refuses are refused; requests it accepts are accepted. Bounded (a few examples per operation, no deadline)
so it runs in about a minute.

One allowance, on the frame routes only: a schema-valid frame request may still get 400, because what makes
it unservable cannot be said in a schema: audio_override must decode as audio, and frame_id must lie inside
the track (its length is the model's, or the uploaded audio's). /ws is left out: a plain HTTP GET of it is
refused by design, and tests/api/test_gateway.py drives it as a WebSocket.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from serving_support import LOOPBACK, ServerThread, StaticRegistry, free_port, models_dir_with, package

from inference_pod.serving.registry import publish
from inference_pod.serving.settings import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "fuzz-key"
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def start_pod(root, **overrides) -> ServerThread:
    models = models_dir_with(root / "models", "demo-1")
    return ServerThread(Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models,
                                 max_batch=8, max_batch_delay_ms=5, encode_threads=2, max_message_mb=1,
                                 preload=["demo"], **overrides))


def url_of(pod: ServerThread) -> str:
    return f"http://{LOOPBACK}:{pod.server.gateway.port}"


@pytest.fixture(scope="module")
def open_pod(tmp_path_factory):
    """No keys and no registry: /models/registry and /models/download answer 409."""
    pod = start_pod(tmp_path_factory.mktemp("fuzz-open"))
    yield pod
    pod.close()


@pytest.fixture(scope="module")
def keyed_pod(tmp_path_factory):
    """API keys and a registry holding another model."""
    root = tmp_path_factory.mktemp("fuzz-keyed")
    publish(package("other-1"), root / "registry")
    registry = StaticRegistry(root / "registry")
    (root / "keys").write_text(f"{KEY}\n")
    pod = start_pod(root, api_keys_file=root / "keys", registry_url=registry.url)
    yield pod
    pod.close()
    registry.close()


CONFIG = {"operations": [{"include-path": "/ws", "enabled": False}, {
    "include-path-regex": "^/generate/",
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", "400", "401", "404", "409", "429"]}}}]}


def schema_of(pod: ServerThread):
    document = requests.get(url_of(pod) + "/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(document, config=SchemathesisConfig.from_dict(CONFIG))


@pytest.fixture(scope="module")
def open_schema(open_pod):
    return schema_of(open_pod)


@pytest.fixture(scope="module")
def keyed_schema(keyed_pod):
    return schema_of(keyed_pod)


open_api = schemathesis.pytest.from_fixture("open_schema")
keyed_api = schemathesis.pytest.from_fixture("keyed_schema")


@open_api.parametrize()
@EXAMPLES
def test_pod_without_keys_conforms_to_its_document(case, open_pod):
    case.call_and_validate(base_url=url_of(open_pod))
    assert open_pod.server.data_plane.state() == "healthy"


@keyed_api.parametrize()
@EXAMPLES
def test_pod_with_keys_conforms_to_its_document(case, keyed_pod):
    case.call_and_validate(base_url=url_of(keyed_pod), headers={"X-API-Key": KEY})
    assert keyed_pod.server.data_plane.state() == "healthy"
