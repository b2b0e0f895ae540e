"""The HTTP gateway of a real pod (gRPC + gateway on 127.0.0.1, demo packages, an HTTP registry, API keys):
every route over real HTTP and every /ws operation over a real WebSocket, checked against the engine, against
the gRPC service of the same pod, and against the pod's own OpenAPI document; bad input of every kind, body
and message limits, queue limits, draining, TLS, and ``lipsync serve`` serving HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import jsonschema
import numpy as np
import pytest
import pytest_asyncio
from conditions import wait_until_async
from prometheus_client.parser import text_string_to_metric_families
from serving_support import (
    LOOPBACK,
    StaticRegistry,
    free_port,
    models_dir_with,
    package,
    small_filesystem,
    speech_pcm16,
    wav_bytes,
)

from inference_pod.api.http.openapi import openapi_document
from inference_pod.app import Pod as InferencePod
from inference_pod.core import audio
from inference_pod.core.encoding import decode_image
from inference_pod.core.engine import Engine
from inference_pod.errors import Unavailable
from inference_pod.package import IDENTIFIER, open_package
from inference_pod.serving.data_plane import MAX_BATCH_ITEMS
from inference_pod.serving.registry import publish
from inference_pod.serving.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("one_torch_thread")]
KEY = "gateway-key"
GRPC_KEY = (("x-api-key", KEY),)
LIMIT_BYTES = 1 << 20  # the pods' --max-message-mb 1
RAW_PREDICTION = {"format": "raw", "region": "prediction"}


def settings_for(models_dir: Path, **overrides) -> Settings:
    values = {"host": LOOPBACK, "port": 0, "metrics_port": 0, "http_port": free_port(), "models_dir": models_dir,
              "max_batch": 8, "max_batch_delay_ms": 20, "encode_threads": 2, "shutdown_grace_s": 10,
              "max_message_mb": 1}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Pod:
    server: InferencePod
    url: str  # http://127.0.0.1:PORT
    http: aiohttp.ClientSession  # sends the API key
    anon: aiohttp.ClientSession  # sends none
    stub: pb_grpc.LipSyncStub

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    async def call(self, method: str, path: str, session: aiohttp.ClientSession | None = None,
                   **kwargs) -> tuple[int, dict]:
        async with (session or self.http).request(method, self.url + path, **kwargs) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json()

    async def frame(self, **body) -> dict:
        status, reply = await self.call("POST", "/generate/frame", json=body)
        assert status == 200, reply
        return reply


@contextlib.asynccontextmanager
async def running(settings: Settings):
    server = await InferencePod(settings).start()
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}",
                                        options=[("grpc.max_receive_message_length", 64 << 20)])
    http = aiohttp.ClientSession(headers={"X-API-Key": KEY})
    anon = aiohttp.ClientSession()
    try:
        yield Pod(server, f"http://{LOOPBACK}:{server.gateway.port}", http, anon, pb_grpc.LipSyncStub(channel))
    finally:
        await http.close()
        await anon.close()
        await channel.close()
        await server.stop(grace_s=5)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gateway-keys") / "keys"
    path.write_text(f"# gateway test keys\n{KEY}\nsecond-key\n")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pod(tmp_path_factory, keys_file):
    """One shared pod: demo and twin on disk, other in an HTTP registry, API keys on."""
    root = tmp_path_factory.mktemp("gateway-pod")
    publish(package("other-1"), root / "registry")
    registry = StaticRegistry(root / "registry")
    models = models_dir_with(root / "models", "demo-1", "twin-1")
    async with running(settings_for(models, registry_url=registry.url, api_keys_file=keys_file)) as pod:
        yield pod
    registry.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def spec(pod) -> dict:
    status, document = await pod.call("GET", "/openapi.json", pod.anon)
    assert status == 200
    return document


def conforms(spec: dict, schema_name: str, instance) -> None:
    """``instance`` is valid against the pod's own OpenAPI document (JSON Schema 2020-12 in OpenAPI 3.1)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    """The demo model, built independently of the server, to check the gateway's numbers against."""
    return Engine.from_package(open_package(package("demo-1"), cache_dir=tmp_path_factory.mktemp("ref")))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_of(reply: dict) -> np.ndarray:
    return decode_image(base64.b64decode(reply["frame"]), reply["format"], reply["width"], reply["height"]).astype(int)


async def ws_replies(ws, until_end: bool = True, count: int | None = None) -> list[dict]:
    """Messages until an end or error (or ``count`` messages)."""
    out = []
    while count is None or len(out) < count:
        message = await asyncio.wait_for(ws.receive_json(), 60)
        out.append(message)
        if until_end and count is None and message["type"] in ("end", "error"):
            break
    return out


# ------------------------------------------------------------------------------------------ open routes and keys


async def test_health_metrics_and_openapi_need_no_key(pod, spec):
    status, body = await pod.call("GET", "/health", pod.anon)
    assert (status, body) == (200, {"status": "healthy"})
    conforms(spec, "Health", body)
    async with pod.anon.get(pod.url + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        names = {family.name for family in text_string_to_metric_families(await response.text())}
    assert {"lipsync_inflight_requests", "lipsync_request_duration_seconds", "lipsync_queue_depth"} <= names
    from openapi_spec_validator import validate

    validate(spec)


PROTECTED = [("GET", "/status", None, 200), ("GET", "/stats", None, 200), ("GET", "/models", None, 200),
             ("GET", "/models/registry", None, 200),
             ("POST", "/models/download?model_name=nobody", None, 404),  # past the key check: not in the registry
             ("POST", "/generate/frame", {"model_name": "demo", "frame_id": 1}, 200),
             ("POST", "/generate/batch", {"requests": [{"model_name": "demo", "frame_id": 1}]}, 200)]


@pytest.mark.parametrize("method, path, body, accepted", PROTECTED)
async def test_api_routes_need_a_valid_key(pod, spec, method, path, body, accepted):
    status, reply = await pod.call(method, path, pod.anon, json=body)
    assert status == 401 and reply["code"] == "UNAUTHENTICATED" and "X-API-Key" in reply["error"]
    conforms(spec, "Error", reply)
    status, reply = await pod.call(method, path, pod.anon, json=body, headers={"X-API-Key": "wrong"})
    assert status == 401 and "not valid" in reply["error"]
    status, reply = await pod.call(method, path, pod.anon, json=body, headers={"Authorization": "Bearer second-key"})
    assert status == accepted, reply


async def test_rejected_keys_are_counted_and_answered_with_a_challenge(pod):
    method = {"method": "GenerateFrame", "code": "UNAUTHENTICATED"}
    before = pod.server.data_plane.metrics.sample("lipsync_request_duration_seconds_count", method)
    async with pod.anon.post(pod.url + "/generate/frame", json={"model_name": "demo", "frame_id": 0}) as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert pod.server.data_plane.metrics.sample("lipsync_request_duration_seconds_count", method) == before + 1


async def test_websocket_handshake_needs_a_key(pod):
    for url, headers in [(pod.ws_url, None), (pod.ws_url + "?api_key=wrong", None),
                         (pod.ws_url, {"X-API-Key": "wrong"})]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await pod.anon.ws_connect(url, headers=headers)
        assert info.value.status == 401
    for url, headers in [(pod.ws_url + f"?api_key={KEY}", None), (pod.ws_url, {"Authorization": f"Bearer {KEY}"})]:
        async with pod.anon.ws_connect(url, headers=headers) as ws:
            await ws.send_json({"type": "ping", "request_id": 7})
            assert await ws.receive_json() == {"type": "pong", "request_id": 7}


# ------------------------------------------------------------------------------------------ frames


async def test_generate_frame_is_the_engines_and_shares_the_grpc_cache(pod, spec, engine):
    for frame_id in (7, 8):
        pred = await pod.frame(model_name="demo", frame_id=frame_id, **RAW_PREDICTION)
        full = await pod.frame(model_name="demo", frame_id=frame_id, format="raw")
        conforms(spec, "Frame", pred)
        template = engine.template_index(frame_id)
        expected = engine.predict([template], engine.windows(engine.default_features, [frame_id]))[0]
        assert (pred["width"], pred["height"], pred["template_id"], pred["model_version"]) == (320, 320, template, "1")
        assert not pred["from_cache"] and pred["timings"]["batch_size"] >= 1
        assert np.abs(image_of(pred) - expected).max() <= 1
        assert (full["width"], full["height"], full["region"]) == (48, 48, "full")
        np.testing.assert_array_equal(image_of(full), engine.composite(template, image_of(pred).astype(np.uint8)))
        box = engine.crop_box(template)
        assert full["crop_box"] == [box.x1, box.y1, box.x2, box.y2, box.size]
    # The gRPC service of the same pod finds the gateway's frame in the same cache, and vice versa.
    jpeg = await pod.frame(model_name="demo", frame_id=9)
    assert base64.b64decode(jpeg["frame"])[:2] == b"\xff\xd8" and jpeg["format"] == "jpeg"
    by_grpc = await pod.stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=9), metadata=GRPC_KEY)
    assert by_grpc.cached and by_grpc.image == base64.b64decode(jpeg["frame"])
    png_grpc = await pod.stub.GenerateFrame(pb.GenerateFrameRequest(
        model="demo", frame_id=10, output=pb.OutputOptions(format=pb.IMAGE_FORMAT_PNG)), metadata=GRPC_KEY)
    png = await pod.frame(model_name="demo", frame_id=10, format="png")
    assert png["from_cache"] and base64.b64decode(png["frame"]) == png_grpc.image
    small = await pod.frame(model_name="demo", frame_id=9, jpeg_quality=10)
    assert len(small["frame"]) < len(jpeg["frame"])


async def test_audio_override(pod):
    pcm = speech_pcm16(1.2, seed=31)
    wav = wav_bytes(pcm)
    http = await pod.frame(model_name="demo", frame_id=4, audio_override=b64(wav), **RAW_PREDICTION)
    assert not http["from_cache"] and http["timings"]["features_ms"] > 0
    by_grpc = await pod.stub.GenerateFrame(pb.GenerateFrameRequest(
        model="demo", frame_id=4, audio=pb.Audio(file=wav),
        output=pb.OutputOptions(format=pb.IMAGE_FORMAT_RAW, region=pb.OUTPUT_REGION_PREDICTION)), metadata=GRPC_KEY)
    assert by_grpc.cached and by_grpc.image == base64.b64decode(http["frame"])  # same audio, same cache entry
    # A browser's data: URL and line-wrapped base64 (base64(1) without -w0) are the same audio.
    wrapped = "\n".join(b64(wav)[i : i + 76] for i in range(0, len(b64(wav)), 76))
    for text in (f"data:audio/wav;base64,{b64(wav)}", wrapped):
        again = await pod.frame(model_name="demo", frame_id=4, audio_override=text, **RAW_PREDICTION)
        assert again["from_cache"] and again["frame"] == http["frame"]
    # 4 s of audio (a body the gateway parses in its CPU pool) has frames the 1 s default track has not.
    long_wav = wav_bytes(speech_pcm16(4.0, seed=32))
    frames = audio.frame_count(len(long_wav) // 2)
    last = await pod.frame(model_name="demo", frame_id=frames - 1, audio_override=b64(long_wav))
    assert last["frame_id"] == frames - 1
    status, reply = await pod.call("POST", "/generate/frame", json={
        "model_name": "demo", "frame_id": frames, "audio_override": b64(long_wav)})
    assert status == 400 and "frame id" in reply["error"]


async def test_models_load_on_demand_and_say_so(pod):
    await pod.server.data_plane.store.unload("twin")
    first = await pod.frame(model_name="twin", frame_id=1)
    second = await pod.frame(model_name="twin", frame_id=2)
    assert first["auto_loaded"] and not second["auto_loaded"]
    assert "twin" in {m.name for m in pod.server.data_plane.store.resident}


BAD_FRAME_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"frame_id": 1}, 400, "'model_name' is required"),
    ({"model_name": 5, "frame_id": 1}, 400, "'model_name' must be a string"),
    ({"model_name": "demo"}, 400, "'frame_id' is required"),
    ({"model_name": "demo", "frame_id": "3"}, 400, "'frame_id' must be an integer"),
    ({"model_name": "demo", "frame_id": True}, 400, "'frame_id' must be an integer"),
    ({"model_name": "demo", "frame_id": 1.5}, 400, "'frame_id' must be an integer"),
    ({"model_name": "demo", "frame_id": 1, "audio": "UklGRg=="}, 400, "unknown field(s) in a frame request: audio"),
    ({"model_name": "demo", "frame_id": 1, "audio_override": "***"}, 400, "not valid base64"),
    ({"model_name": "demo", "frame_id": 1, "audio_override": 12}, 400, "'audio_override' must be a string"),
    ({"model_name": "demo", "frame_id": 1, "audio_override": ""}, 400, "'audio_override' is empty"),
    ({"model_name": "demo", "frame_id": 1, "audio_override": b64(b"definitely not audio")}, 400, "audio"),
    ({"model_name": "demo", "frame_id": 0, "audio_override": b64(wav_bytes(b"\0\0" * 100))}, 400, "too short"),
    ({"model_name": "nobody", "frame_id": 0}, 404, "nobody"),
    ({"model_name": "../etc", "frame_id": 0}, 400, "model name"),
    ({"model_name": "demo", "frame_id": -1}, 400, "frame id"),
    ({"model_name": "demo", "frame_id": 10**12}, 400, "frame id"),
    ({"model_name": "demo", "frame_id": 0, "format": "gif"}, 400, "format"),
    ({"model_name": "demo", "frame_id": 0, "format": 1}, 400, "'format' must be a string"),
    ({"model_name": "demo", "frame_id": 0, "region": "mouth"}, 400, "region"),
    ({"model_name": "demo", "frame_id": 0, "jpeg_quality": 101}, 400, "quality"),
]
CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}
INT64_MAX = 2**63 - 1
NOT_INTEGERS = [(1.5, "must be an integer, got a number"), (True, "must be an integer, got a boolean"),
                ("2", "must be an integer, got a string"), (1e19, f"must be at most {INT64_MAX}"),
                (2.0**63, f"must be at most {INT64_MAX}"), (10**30, f"must be at most {INT64_MAX}")]


def _body(body) -> dict:
    return {"data": body} if isinstance(body, bytes) else {"json": body}


@pytest.mark.parametrize("body, status, match", BAD_FRAME_REQUESTS)
async def test_bad_frame_requests_get_a_clear_json_error(pod, spec, body, status, match):
    got, reply = await pod.call("POST", "/generate/frame", **_body(body))
    assert (got, reply["code"]) == (status, CODES[status]), reply
    assert match in reply["error"]
    conforms(spec, "Error", reply)


async def test_an_integer_may_be_written_with_a_zero_fraction(pod, spec):
    """JSON Schema counts 3.0 as an integer (schemathesis sends such numbers), and so does the pod; 1.5,
    booleans and frame ids past gRPC's int64 stay refused."""
    reply = await pod.frame(model_name="demo", frame_id=3.0, jpeg_quality=80.0)
    assert reply["frame_id"] == 3 and type(reply["frame_id"]) is int
    conforms(spec, "Frame", reply)
    status, reply = await pod.call("POST", "/generate/batch", json={"requests": [
        {"model_name": "demo", "frame_id": 4.0}, {"model_name": "demo", "frame_id": 79143932915410.0}]})
    assert status == 200 and reply["results"]["demo_4"]["success"], reply
    assert "outside the track" in reply["results"]["demo_79143932915410"]["error"]  # an integer, then too far
    async with pod.http.ws_connect(pod.ws_url) as ws:
        await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 5.0, "request_id": 7.0})
        [reply] = await ws_replies(ws, count=1)
        assert (reply["type"], reply["frame_id"], reply["request_id"]) == ("frame", 5, 7)
        await ws.send_json({"type": "stream", "model_name": "demo", "first": 1.0, "last": 2.0})
        assert [m["frame_id"] for m in await ws_replies(ws) if m["type"] == "frame"] == [1, 2]
    for value, match in NOT_INTEGERS:
        status, reply = await pod.call("POST", "/generate/frame", json={"model_name": "demo", "frame_id": value})
        assert (status, reply["code"]) == (400, "INVALID_ARGUMENT") and match in reply["error"], (value, reply)
        status, reply = await pod.call("POST", "/generate/batch", json={"requests": [
            {"model_name": "demo", "frame_id": value}]})
        assert status == 400 and f"requests[0]: 'frame_id' {match}" in reply["error"], (value, reply)


DEEP = [30_000, 100_000]  # parsed on the event loop, and in the CPU pool (bodies over 64 KiB)


@pytest.mark.parametrize("depth", DEEP)
@pytest.mark.parametrize("path, template", [
    ("/generate/frame", b"%s"), ("/generate/frame", b'{"model_name": "demo", "frame_id": %s}'),
    ("/generate/batch", b'{"requests": %s}'), ("/generate/batch", b'{"requests": [{"model_name": %s}]}')])
async def test_deeply_nested_json_is_bad_input(pod, path, template, depth):
    nested = b"[" * depth + b"]" * depth
    status, reply = await pod.call("POST", path, data=template % nested, headers={"Content-Type": "application/json"})
    assert (status, reply["code"]) == (400, "INVALID_ARGUMENT") and "nested too deeply" in reply["error"], reply
    assert pod.server.data_plane.state() == "healthy"


async def test_deeply_nested_ws_messages_are_an_error_message(pod, spec):
    async with pod.http.ws_connect(pod.ws_url) as ws:
        for depth in DEEP:
            for text in ("[" * depth + "]" * depth, '{"type": "frame", "model_name": ' + "{\"a\": " * depth + "1"
                         + "}" * depth + "}"):
                await ws.send_str(text)
                [reply] = await ws_replies(ws, count=1)
                assert (reply["type"], reply["code"]) == ("error", "INVALID_ARGUMENT"), reply
                assert "nested too deeply" in reply["message"]
                conforms(spec, "WsError", reply)
        await ws.send_json({"type": "ping", "request_id": "still open"})
        assert await ws.receive_json() == {"type": "pong", "request_id": "still open"}


async def test_oversized_bodies_are_refused(pod):
    big = b'{"model_name": "demo", "frame_id": 1, "audio_override": "' + b"A" * LIMIT_BYTES + b'"}'
    status, reply = await pod.call("POST", "/generate/frame", data=big)
    assert (status, reply["code"]) == (413, "RESOURCE_EXHAUSTED") and str(LIMIT_BYTES) in reply["error"]

    async def chunked():  # no Content-Length: the limit is found while reading
        for _ in range(3):
            yield b" " * (LIMIT_BYTES // 2)

    status, reply = await pod.call("POST", "/generate/batch", data=chunked())
    assert (status, reply["code"]) == (413, "RESOURCE_EXHAUSTED")
    assert (await pod.frame(model_name="demo", frame_id=1))["frame_id"] == 1


async def test_unknown_routes_and_methods_are_json_errors(pod):
    status, reply = await pod.call("GET", "/generate/everything")
    assert (status, reply["code"]) == (404, "NOT_FOUND") and "/openapi.json" in reply["error"]
    async with pod.http.get(pod.url + "/generate/frame") as response:
        reply = await response.json()
        assert (response.status, reply["code"], response.headers["Allow"]) == (405, "UNIMPLEMENTED", "POST")
        assert "allowed: POST" in reply["error"]
    status, reply = await pod.call("GET", "/ws")  # plain HTTP, no upgrade
    assert (status, reply["code"]) == (400, "INVALID_ARGUMENT") and "WebSocket" in reply["error"]


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, x-api-key"}


async def cors_of(pod, origin: str | None, preflight: bool = False) -> tuple[int, dict[str, str]]:
    """(status, CORS headers) of /models, or of a preflight of /generate/frame, for a page at ``origin``."""
    headers = {"Origin": origin} if origin else {}
    method, path = ("OPTIONS", "/generate/frame") if preflight else ("GET", "/models")
    async with pod.http.request(method, pod.url + path, headers={**headers, **(PREFLIGHT if preflight else {})}) \
            as response:
        return response.status, {k: v for k, v in response.headers.items()
                                 if k.startswith("Access-Control-") or k == "Vary"}


async def ws_opens(pod, origin: str | None) -> int:
    """101 if a WebSocket handshake from a page at ``origin`` opens (and answers a ping), else its status."""
    try:
        async with pod.http.ws_connect(pod.ws_url, headers={"Origin": origin} if origin else {}) as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json())["type"] == "pong"
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


async def test_browsers_may_call_only_from_the_pods_own_pages_by_default(pod):
    """Without API keys any site a user visits could drive a pod on their machine: by default only the pod's
    own pages (the live page) get CORS headers and WebSockets; clients without an Origin are unaffected."""
    for preflight in (False, True):
        status, cors = await cors_of(pod, "https://app.example", preflight)
        assert status in (200, 204) and "Access-Control-Allow-Origin" not in cors, cors  # the browser refuses
    assert await ws_opens(pod, "https://app.example") == 403
    assert await ws_opens(pod, "null") == 403  # sandboxed frames and file:// pages
    own = pod.url  # the live page's origin
    status, cors = await cors_of(pod, own)
    assert status == 200 and cors["Access-Control-Allow-Origin"] == own and cors["Vary"] == "Origin"
    assert await ws_opens(pod, own) == 101
    status, cors = await cors_of(pod, None)  # curl, the CLI, other servers
    assert status == 200 and cors == {}
    assert await ws_opens(pod, None) == 101
    status, reply = await pod.call("GET", "/ws", headers={"Origin": "https://app.example", "Upgrade": "websocket",
                                                         "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert (status, reply["code"]) == (403, "PERMISSION_DENIED") and "--allowed-origins" in reply["error"]


async def test_allowed_origins_are_a_setting(tmp_path):
    (tmp_path / "models").mkdir()
    async with running(settings_for(tmp_path / "models", allowed_origins=["https://app.example"])) as pod:
        for preflight in (False, True):
            status, cors = await cors_of(pod, "https://app.example", preflight)
            assert cors["Access-Control-Allow-Origin"] == "https://app.example" and cors["Vary"] == "Origin"
        assert "X-API-Key" in cors["Access-Control-Allow-Headers"]
        assert await ws_opens(pod, "https://app.example") == 101
        assert await ws_opens(pod, "https://other.example") == 403
        assert "Access-Control-Allow-Origin" not in (await cors_of(pod, "https://other.example"))[1]
    async with running(settings_for(tmp_path / "models", allowed_origins=["*"])) as pod:
        for origin in ("https://other.example", None):
            assert (await cors_of(pod, origin))[1]["Access-Control-Allow-Origin"] == "*"
            assert (await cors_of(pod, origin, preflight=True))[1]["Access-Control-Allow-Origin"] == "*"
            assert await ws_opens(pod, origin) == 101


# ------------------------------------------------------------------------------------------ batches


async def test_generate_batch(pod, spec):
    await pod.server.data_plane.store.unload("twin")
    await pod.frame(model_name="demo", frame_id=11, **RAW_PREDICTION)  # cached: both demo_11 items hit it
    requests = [{"model_name": "demo", "frame_id": i, **RAW_PREDICTION} for i in range(11, 17)]
    requests[2:2] = [{"model_name": "nobody", "frame_id": 0}]
    requests[4:4] = [{"model_name": "demo", "frame_id": 10_000}]
    requests += [{"model_name": "twin", "frame_id": 1}, {"model_name": "demo", "frame_id": 11, **RAW_PREDICTION}]
    status, reply = await pod.call("POST", "/generate/batch", json={"requests": requests})
    assert status == 200
    conforms(spec, "BatchResponse", reply)
    results = reply["results"]
    assert list(results) == ["demo_11", "demo_12", "nobody_0", "demo_13", "demo_10000", "demo_14", "demo_15",
                             "demo_16", "twin_1", "demo_11#2"]
    assert [r["index"] for r in results.values()] == list(range(len(requests)))
    assert [r["success"] for r in results.values()] == [True, True, False, True, False, True, True, True, True,
                                                        True]
    assert results["nobody_0"]["code"] == "NOT_FOUND" and "nobody" in results["nobody_0"]["error"]
    assert results["demo_10000"]["code"] == "INVALID_ARGUMENT" and results["demo_10000"]["frame_id"] == 10_000
    assert "outside the track" in results["demo_10000"]["error"]
    frames = [r for r in results.values() if r["success"]]
    assert [f["frame_id"] for f in frames] == [11, 12, 13, 14, 15, 16, 1, 11]
    assert max(f["timings"]["batch_size"] for f in frames) > 1  # the items went to the device together
    assert results["twin_1"]["auto_loaded"] and not results["demo_12"]["auto_loaded"]
    assert (reply["total_requests"], reply["processed_count"], reply["failed_count"]) == (10, 8, 2)
    assert reply["auto_loaded_models"] == ["twin"] and reply["success"] is False
    assert reply["cached_count"] == sum(f["from_cache"] for f in frames) >= 2  # demo_11 and demo_11#2
    # The same frame through /generate/frame: the batch cached it.
    single = await pod.frame(model_name="demo", frame_id=14, **RAW_PREDICTION)
    assert single["from_cache"] and single["frame"] == results["demo_14"]["frame"]

    status, again = await pod.call("POST", "/generate/batch", json={"requests": requests[:2]})
    assert again["success"] and again["cached_count"] == again["processed_count"] == 2
    status, empty = await pod.call("POST", "/generate/batch", json={"requests": []})
    assert (status, empty["success"], empty["total_requests"], empty["results"]) == (200, True, 0, {})


@pytest.mark.parametrize("body, match", [
    ({"requests": {"model_name": "demo"}}, "'requests' must be an array"),
    ({}, "'requests' is required"),
    ({"requests": [], "format": "png"}, "unknown field(s) in a batch request: format"),
    # Items the schema refuses fail the whole request, naming the item, before any work is done.
    ({"requests": [{"model_name": "demo", "frame_id": 0}, "not an object"]}, "requests[1] must be a JSON object"),
    ({"requests": [{"model_name": "demo"}]}, "requests[0]: 'frame_id' is required"),
    ({"requests": [{"model_name": "demo", "frame_id": -3}]}, "requests[0]: frame id -3 is negative"),
    ({"requests": [{"model_name": "demo", "frame_id": 0, "colour": 1}]}, "requests[0]: unknown field(s)"),
    ({"requests": [{"model_name": "Demo!", "frame_id": 0}]}, "requests[0]: model name 'Demo!' is not valid"),
    ({"requests": [{}] * (MAX_BATCH_ITEMS + 1)}, f"at most {MAX_BATCH_ITEMS}"),
    (b"{", "not valid JSON"),
])
async def test_bad_batches(pod, body, match):
    status, reply = await pod.call("POST", "/generate/batch", **_body(body))
    assert (status, reply["code"]) == (400, "INVALID_ARGUMENT") and match in reply["error"]


# ------------------------------------------------------------------------------------------ models, stats, metrics


async def test_models_and_stats_are_the_grpc_numbers(pod, spec):
    await pod.frame(model_name="demo", frame_id=0)
    status, models = await pod.call("GET", "/models")
    assert status == 200
    conforms(spec, "Models", models)
    listed = await pod.stub.ListModels(pb.ListModelsRequest(), metadata=GRPC_KEY)
    assert [(m["name"], m["version"], m["state"], m["location"], m["frame_count"]) for m in models["models"]] == [
        (m.name, m.version, pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(), m.location,
         m.frame_count) for m in listed.models]
    assert "demo" in models["loaded_models"] and set(models["loaded_models"]) | set(models["available_models"]) \
        >= {"demo", "twin"}
    # Memory by where it lives: the same numbers both ways, the parts adding up to the whole.
    demo = next(m for m in listed.models if m.name == "demo")
    assert demo.device_memory_bytes > 0 and demo.host_memory_bytes > 0
    assert demo.memory_bytes == demo.device_memory_bytes + demo.host_memory_bytes
    (demo_json,) = (m for m in models["models"] if m["name"] == "demo")
    assert (demo_json["memory_bytes"], demo_json["device_memory_bytes"], demo_json["host_memory_bytes"]) == (
        demo.memory_bytes, demo.device_memory_bytes, demo.host_memory_bytes)
    # Its prepared templates are mapped from the store: shared page cache, apart from memory_bytes.
    assert demo.mapped_memory_bytes > demo.frame_count * 328 * 328 * 3
    assert demo_json["mapped_memory_bytes"] == demo.mapped_memory_bytes

    status, stats = await pod.call("GET", "/stats")
    grpc_stats = await pod.stub.GetStats(pb.GetStatsRequest(), metadata=GRPC_KEY)
    conforms(spec, "Stats", stats)
    # In flight: the calls being served other than the one asking, on every door (nothing else runs here).
    assert (stats["device"], stats["max_batch"], stats["inflight_requests"], stats["draining"]) == (
        grpc_stats.device, grpc_stats.max_batch, grpc_stats.inflight_requests, False)
    assert grpc_stats.inflight_requests == 0
    assert {m["name"]: m["frames_generated"] for m in stats["models"]} == {
        m.name: m.frames_generated for m in grpc_stats.models}
    assert stats["cache"]["hits"] == grpc_stats.cache.hits and stats["cache"]["backend"] == "memory"

    status, state = await pod.call("GET", "/status")
    conforms(spec, "Status", state)
    assert state["status"] == "healthy" and state["ports"] == {"grpc": pod.server.port,
                                                               "http": pod.server.gateway.port, "metrics": None}
    assert "demo" in state["models_resident"] and state["api_keys_required"] and state["inflight_requests"] == 0
    assert state["registry_url"] == pod.server.data_plane.registry.url
    # One meaning of loaded and available on every route: /status's lists are /models' states.
    assert (state["models_resident"], state["models_available"]) == (models["loaded_models"],
                                                                     models["available_models"])


async def test_per_model_stats_count_since_the_model_was_loaded(pod):
    """frames_generated and batches start together at a load: after unload and load both are 0."""
    await pod.frame(model_name="twin", frame_id=15, format="png", region="prediction")
    await pod.server.data_plane.store.unload("twin")
    await pod.call("POST", "/generate/frame", json={"model_name": "twin", "frame_id": 16, "format": "png",
                                                    "region": "prediction"})
    await pod.server.data_plane.store.unload("twin")
    await pod.server.data_plane.store.load("twin")
    status, stats = await pod.call("GET", "/stats")
    twin = next(m for m in stats["models"] if m["name"] == "twin")
    assert (twin["frames_generated"], twin["frames_from_cache"], twin["batches"]) == (0, 0, 0)
    frames = await asyncio.gather(*(pod.frame(model_name="twin", frame_id=i, format="png", region="prediction")
                                    for i in (17, 18, 19)))
    assert not any(f["from_cache"] for f in frames)
    twin = next(m for m in (await pod.stub.GetStats(pb.GetStatsRequest(), metadata=GRPC_KEY)).models
                if m.name == "twin")
    assert twin.frames_generated == 3 and twin.batches >= 1
    assert twin.mean_batch_size * twin.batches == pytest.approx(twin.frames_generated)


async def test_registry_listing_and_download(pod, spec):
    status, listing = await pod.call("GET", "/models/registry")
    assert status == 200
    conforms(spec, "Registry", listing)
    assert [(p["name"], p["version"]) for p in listing["packages"]] == [("other", "1")]
    assert listing["packages"][0]["url"].startswith(f"http://{LOOPBACK}") and len(listing["packages"][0]["sha256"]) == 64

    status, loaded = await pod.call("POST", "/models/download?model_name=other")
    assert status == 200, loaded
    conforms(spec, "Download", loaded)
    assert (loaded["source"], loaded["downloaded"], loaded["version"]) == ("registry", True, "1")
    assert pod.server.data_plane.metrics.sample("lipsync_model_loads_total",
                                     {"model": "other", "source": "registry", "result": "ok"}) == 1
    assert loaded["model"]["state"] == "loaded" and loaded["model"]["name"] == "other"
    status, again = await pod.call("POST", "/models/download?model_name=other&version=1")
    assert (again["source"], again["downloaded"]) == ("memory", False)
    assert (await pod.frame(model_name="other", frame_id=2))["model_name"] == "other"

    for query, code, match in [("model_name=nobody", 404, "not in the registry"),
                               ("model_name=other&version=9", 404, "other 9"),
                               ("", 400, "model_name is required"), ("model_name=A/B", 400, "model name"),
                               ("model_name=other&version=", 400, "version is empty"),
                               ("model_name=other&version=1/../2", 400, "model version"),
                               ("model_name=other&colour=red", 400, "unknown field(s) in the query: colour")]:
        status, reply = await pod.call("POST", f"/models/download?{query}")
        assert status == code and match in reply["error"], reply


async def test_metrics_route_serves_the_servers_registry(pod):
    labels = {"method": "GenerateFrame", "code": "NOT_FOUND"}
    before = pod.server.data_plane.metrics.sample("lipsync_request_duration_seconds_count", labels)
    await pod.call("POST", "/generate/frame", json={"model_name": "nobody", "frame_id": 0})
    await pod.frame(model_name="demo", frame_id=2)
    async with pod.anon.get(pod.url + "/metrics") as response:
        text = await response.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    served = samples[("lipsync_request_duration_seconds_count", tuple(sorted(labels.items())))]
    assert served == before + 1 == pod.server.data_plane.metrics.sample("lipsync_request_duration_seconds_count", labels)
    ok = (("code", "OK"), ("method", "GenerateFrame"))
    assert samples[("lipsync_request_duration_seconds_count", ok)] > 0


async def test_openapi_documents_every_route(pod, spec):
    routes = {(r.method, r.resource.canonical) for r in pod.server.gateway.app.router.routes() if r.method != "HEAD"}
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert routes == documented
    open_paths = {path for path, item in spec["paths"].items() if item.get("get", {}).get("security") == []}
    assert open_paths == {"/health", "/metrics", "/openapi.json", "/", "/web/{name}"}
    assert spec["security"] and "401" in spec["paths"]["/models"]["get"]["responses"]


async def test_openapi_declares_health_per_model_and_the_websocket_handshake(pod, spec):
    health = spec["paths"]["/health"]["get"]
    [service] = health["parameters"]
    assert (service["name"], service["in"], service["required"]) == ("service", "query", False)
    assert {"200", "400", "404", "503"} <= set(health["responses"]) and "401" not in health["responses"]
    status, reply = await pod.call("GET", "/health?service=nobody", pod.anon)
    assert (status, reply["code"]) == (404, "NOT_FOUND")
    conforms(spec, "Error", reply)
    keyed = openapi_document("0", 8, keys_required=True, health_requires_key=True)
    assert "401" in keyed["paths"]["/health"]["get"]["responses"]
    # A plain GET of /ws lacks the handshake the document requires: its 400 answers an invalid request.
    ws = spec["paths"]["/ws"]["get"]
    required = {p["name"] for p in ws["parameters"] if p["in"] == "header" and p["required"]}
    assert required == {"Upgrade", "Connection", "Sec-WebSocket-Version", "Sec-WebSocket-Key"}
    assert {"101", "400", "403"} <= set(ws["responses"])
    assert spec["components"]["schemas"]["FrameRequest"]["properties"]["frame_id"]["maximum"] == INT64_MAX


async def test_openapi_names_are_the_validators_pattern():
    """The schema accepts exactly the names and versions the server does."""
    document = openapi_document("0", 8, keys_required=False)
    name = document["components"]["schemas"]["FrameRequest"]["properties"]["model_name"]["pattern"]
    query = {p["name"]: p["schema"]["pattern"] for p in document["paths"]["/models/download"]["post"]["parameters"]}
    assert name == query["model_name"] == query["version"] == f"^{IDENTIFIER.pattern}$"
    audio = document["components"]["schemas"]["FrameRequest"]["properties"]["audio_override"]["anyOf"][0]
    assert audio["minLength"] == 4


# ------------------------------------------------------------------------------------------ WebSocket


async def test_ws_frames_streams_and_pings(pod, spec, engine):
    async with pod.http.ws_connect(pod.ws_url) as ws:
        await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 5, "request_id": "a", **RAW_PREDICTION})
        [frame] = await ws_replies(ws, count=1)
        conforms(spec, "WsFrame", frame)
        http = await pod.frame(model_name="demo", frame_id=5, **RAW_PREDICTION)
        assert frame["type"] == "frame" and frame["request_id"] == "a" and frame["frame"] == http["frame"]

        await ws.send_json({"type": "stream", "model_name": "demo", "first": 2, "last": 6, "request_id": 1})
        streamed = await ws_replies(ws)
        assert [m["frame_id"] for m in streamed[:-1]] == [2, 3, 4, 5, 6]
        assert streamed[-1] == {"type": "end", "frames": 5, "request_id": 1}
        conforms(spec, "WsEnd", streamed[-1])

        # Two operations at once on one socket: replies interleave, request ids tell them apart.
        await ws.send_json({"type": "stream", "model_name": "demo", "first": 0, "last": 3, "realtime": True,
                            "fps": 200, "request_id": "paced"})
        track = len(engine.default_features)
        await ws.send_json({"type": "stream", "model_name": "demo", "first": track - 4, "request_id": "tail",
                            "format": "png"})
        replies = await ws_replies(ws, count=2 * (4 + 1))
        by_id = {rid: [m for m in replies if m["request_id"] == rid] for rid in ("paced", "tail")}
        assert [m.get("frame_id") for m in by_id["paced"]] == [0, 1, 2, 3, None]
        assert [m.get("frame_id") for m in by_id["tail"]] == [*range(track - 4, track), None]  # to the track's end
        assert {m["format"] for m in by_id["tail"][:-1]} == {"png"}

        await ws.send_json({"type": "ping"})
        assert await ws.receive_json() == {"type": "pong"}


@pytest.mark.parametrize("chunk", [1280, 1 << 20], ids=["40ms", "one-message"])  # the pod slices big ones
async def test_ws_live_audio_gives_the_frames_of_the_whole_clip(pod, spec, chunk):
    pcm = speech_pcm16(1.0, seed=5)
    async with pod.http.ws_connect(pod.ws_url) as ws:
        await ws.send_json({"type": "audio_start", "model_name": "demo", "sample_rate": 16000, "request_id": "mic",
                            **RAW_PREDICTION})
        for start in range(0, len(pcm), chunk):
            await ws.send_bytes(pcm[start : start + chunk])
        await ws.send_json({"type": "audio_end"})
        live = await ws_replies(ws)
    assert live[-1] == {"type": "end", "frames": len(live) - 1, "request_id": "mic"}
    frames = live[:-1]
    assert [f["frame_id"] for f in frames] == list(range(audio.frame_count(len(pcm) // 2)))
    conforms(spec, "WsFrame", frames[0])
    status, whole = await pod.call("POST", "/generate/batch", json={"requests": [
        {"model_name": "demo", "frame_id": f["frame_id"], "audio_override": b64(wav_bytes(pcm)), **RAW_PREDICTION}
        for f in frames]})
    assert whole["processed_count"] == len(frames)
    for got, expected in zip(frames, whole["results"].values(), strict=True):
        assert got["template_id"] == expected["template_id"]
        assert np.abs(image_of(got) - image_of(expected)).max() <= 2


WS_ERRORS = [
    ("{not json", "INVALID_ARGUMENT", "not valid JSON"),
    ({"model_name": "demo"}, "INVALID_ARGUMENT", "'type' is required"),
    ({"type": "teleport"}, "INVALID_ARGUMENT", "unknown message type"),
    ({"type": "frame", "model_name": "nobody", "frame_id": 0}, "NOT_FOUND", "nobody"),
    ({"type": "frame", "model_name": "demo", "frame_id": -1}, "INVALID_ARGUMENT", "frame id"),
    ({"type": "frame", "model_name": "demo", "frame_id": 0, "audio_override": "%%"}, "INVALID_ARGUMENT", "base64"),
    ({"type": "frame", "model_name": "demo", "frame_id": 0, "first": 3}, "INVALID_ARGUMENT", "unknown field"),
    ({"type": "stream", "model_name": "demo", "first": 5, "last": 2}, "INVALID_ARGUMENT", "before"),
    ({"type": "stream", "model_name": "demo", "realtime": "yes"}, "INVALID_ARGUMENT", "'realtime' must be a boolean"),
    ({"type": "stream", "model_name": "demo", "realtime": True, "fps": -5}, "INVALID_ARGUMENT", "fps"),
    ({"type": "audio_end"}, "INVALID_ARGUMENT", "without an open audio session"),
    ({"type": "frame", "model_name": "demo", "frame_id": 0, "request_id": [1]}, "INVALID_ARGUMENT", "request_id"),
]


async def test_ws_errors_leave_the_socket_usable(pod, spec):
    async with pod.http.ws_connect(pod.ws_url) as ws:
        for message, code, match in WS_ERRORS:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_json(message))
            [reply] = await ws_replies(ws, count=1)
            assert (reply["type"], reply["code"]) == ("error", code) and match in reply["message"], (message, reply)
            conforms(spec, "WsError", reply)
        # Binary audio outside a session is an error.
        await ws.send_bytes(b"\0\0" * 100)
        [reply] = await ws_replies(ws, count=1)
        assert reply["code"] == "INVALID_ARGUMENT" and "audio_start" in reply["message"]
        assert reply["message"].startswith("a session starts with its config")  # the words of a session's
        # A session that fails at its start: the audio sent for it is dropped without a reply each.
        for start, code, match in [({"model_name": "nobody"}, "NOT_FOUND", "nobody"),
                                   ({"model_name": "demo", "sample_rate": 5}, "INVALID_ARGUMENT", "sample rate"),
                                   ({"model_name": "demo", "channels": 0}, "INVALID_ARGUMENT", "channel"),
                                   ({"model_name": "demo", "rate": 8000}, "INVALID_ARGUMENT", "unknown field")]:
            await ws.send_json({"type": "audio_start", **start})
            [reply] = await ws_replies(ws, count=1)
            assert (reply["code"], match in reply["message"]) == (code, True), reply
            await ws.send_bytes(b"\0\0" * 100)
            await ws.send_json({"type": "audio_end"})
            await ws.send_json({"type": "ping", "request_id": match})
            assert await ws.receive_json() == {"type": "pong", "request_id": match}  # nothing came before it
        # Audio too short to make a frame: the session ends with an error.
        await ws.send_json({"type": "audio_start", "model_name": "demo", "request_id": "short"})
        await ws.send_json({"type": "audio_start", "model_name": "demo", "request_id": "second"})
        [reply] = await ws_replies(ws, count=1)
        assert reply["request_id"] == "second" and "already open" in reply["message"]
        await ws.send_bytes(b"\0\0" * 50)
        await ws.send_json({"type": "audio_end"})
        [reply] = await ws_replies(ws, count=1)
        assert reply["request_id"] == "short" and "too short" in reply["message"]
        # Still usable.
        await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 3, "request_id": "ok"})
        [reply] = await ws_replies(ws, count=1)
        assert (reply["type"], reply["frame_id"], reply["request_id"]) == ("frame", 3, "ok")


@pytest.mark.parametrize("size", [LIMIT_BYTES + 1, 5 * LIMIT_BYTES, 20 * LIMIT_BYTES])
async def test_ws_oversized_message_is_closed_with_1009_however_large(pod, size):
    """The peer is still sending when the server refuses the message from its header: it must still read the
    close frame (1009), not a reset connection."""
    async with pod.http.ws_connect(pod.ws_url) as ws:
        await ws.send_bytes(b"\0" * size)
        closing = await ws.receive()
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)


async def test_ws_oversized_message_closes_only_that_socket(pod):
    async with pod.http.ws_connect(pod.ws_url) as big, pod.http.ws_connect(pod.ws_url) as other:
        await big.send_bytes(b"\0" * (LIMIT_BYTES + 1))
        closing = await big.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await other.send_json({"type": "frame", "model_name": "demo", "frame_id": 1})
        assert (await other.receive_json())["frame_id"] == 1


async def test_bad_input_never_harms_other_requests(pod):
    """A WebSocket stream and good HTTP frames run while every kind of bad request hits the same model."""

    async def stream() -> list[int]:
        async with pod.http.ws_connect(pod.ws_url) as ws:
            await ws.send_json({"type": "stream", "model_name": "demo", "first": 0, "last": 11, "format": "raw"})
            return [m.get("frame_id") for m in await ws_replies(ws)]

    async def bad(body) -> int:
        return (await pod.call("POST", "/generate/frame", **_body(body)))[0]

    oversized = b'{"model_name": "demo", "frame_id": 1, "x": "' + b"A" * LIMIT_BYTES + b'"}'
    results = await asyncio.gather(
        stream(), *(bad(body) for body, _, _ in BAD_FRAME_REQUESTS * 2), bad(oversized),
        *(pod.frame(model_name="demo", frame_id=i, format="png") for i in range(4)))
    assert results[0] == [*range(12), None]
    assert all(400 <= status < 500 for status in results[1:-4])
    assert [r["frame_id"] for r in results[-4:]] == [0, 1, 2, 3]
    assert await pod.call("GET", "/health", pod.anon) == (200, {"status": "healthy"})


# ------------------------------------------------------------------------------------------ pods of their own


async def test_queue_limits_and_a_pod_without_registry(tmp_path):
    models = models_dir_with(tmp_path / "models", "demo-1")
    settings = settings_for(models, max_queue=2, max_batch=8, max_batch_delay_ms=300, preload=["demo"])
    async with running(settings) as pod:
        outcomes = await asyncio.gather(*(pod.call("POST", "/generate/frame", json={"model_name": "demo",
                                                                                      "frame_id": i})
                                          for i in range(4)))
        assert sorted(status for status, _ in outcomes) == [200, 200, 429, 429]
        rejected = [reply for status, reply in outcomes if status == 429]
        assert rejected[0]["code"] == "RESOURCE_EXHAUSTED" and "retry" in rejected[0]["error"]
        # No registry configured: one answer on both front doors (not a server error: the pod's setup).
        await expect_grpc(grpc.StatusCode.FAILED_PRECONDITION, pod.stub.ListRegistry(pb.ListRegistryRequest()),
                          "--registry-url")
        for path, method in [("/models/registry", "GET"), ("/models/download?model_name=demo", "POST")]:
            status, reply = await pod.call(method, path)
            assert (status, reply["code"]) == (409, "FAILED_PRECONDITION") and "--registry-url" in reply["error"]


async def test_a_pod_without_keys_documents_no_security(tmp_path):
    """The OpenAPI document describes the pod as it runs: no keys configured, no security declared."""
    async with running(settings_for(models_dir_with(tmp_path / "models", "demo-1"))) as pod:
        status, document = await pod.call("GET", "/openapi.json", pod.anon)
        assert status == 200 and "security" not in document
        assert not any("security" in operation or "401" in operation["responses"]
                       for item in document["paths"].values() for operation in item.values()
                       if operation.get("security") != [])
        status, models = await pod.call("GET", "/models", pod.anon)
        assert status == 200 and models["available_models"] == ["demo"]


async def expect_grpc(code: grpc.StatusCode, call, match: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code and match in info.value.details(), info.value.details()


async def test_a_full_disk_is_resource_exhausted_on_both_doors(tmp_path):
    """A store on a real 2 MiB filesystem cannot hold the package: 507 / RESOURCE_EXHAUSTED saying what to do."""
    with small_filesystem(tmp_path / "small") as disk:
        models = models_dir_with(tmp_path / "models", "demo-1")
        async with running(settings_for(models, store_dir=disk)) as pod:
            status, reply = await pod.call("POST", "/generate/frame", json={"model_name": "demo", "frame_id": 0})
            assert (status, reply["code"]) == (507, "RESOURCE_EXHAUSTED"), reply
            assert "no space left on device" in reply["error"] and "--store-dir" in reply["error"]
            await expect_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, pod.stub.GenerateFrame(
                pb.GenerateFrameRequest(model="demo", frame_id=0), metadata=GRPC_KEY), "no space left on device")


async def test_unreachable_registry_is_unavailable(tmp_path):
    unreachable = f"http://{LOOPBACK}:{free_port()}/"
    async with running(settings_for(tmp_path / "models", registry_url=unreachable)) as pod:
        pod.server.data_plane.registry.backoff_s = 0.01  # the retries are the registry tests' subject; keep this one quick
        for path, method in [("/models/registry", "GET"), ("/models/download?model_name=other", "POST")]:
            status, reply = await pod.call(method, path)
            assert (status, reply["code"]) == (503, "UNAVAILABLE") and "registry unreachable" in reply["error"]


async def test_draining(tmp_path):
    """While the pod drains, everything new is refused and the operation in flight runs to its end. That
    operation is a live audio session the client holds open (half its audio sent), so it is in flight at
    every check however slow the machine is; then the client finishes it."""
    models = models_dir_with(tmp_path / "models", "demo-1")
    pcm = speech_pcm16(1.0, seed=5)
    # The grace is longer than the checks below can take on a busy machine: the session ends when the client
    # ends it, not when the grace runs out (that cut-off would close it).
    async with running(settings_for(models, preload=["demo"], shutdown_grace_s=240)) as pod:
        async with pod.http.ws_connect(pod.ws_url) as ws, pod.http.ws_connect(pod.ws_url) as idle:
            await ws.send_json({"type": "audio_start", "model_name": "demo"})
            await ws.send_bytes(pcm[: len(pcm) // 2])
            received = await ws_replies(ws, count=1)
            stopping = asyncio.ensure_future(pod.server.stop())  # what SIGTERM does
            await wait_until_async(lambda: pod.server.data_plane.draining, what="the pod to start draining")
            assert await pod.call("GET", "/health", pod.anon) == (503, {"status": "draining"})
            status, reply = await pod.call("POST", "/generate/frame", json={"model_name": "demo", "frame_id": 0})
            assert (status, reply["code"]) == (503, "UNAVAILABLE") and "shutting down" in reply["error"]
            status, state = await pod.call("GET", "/status")
            assert status == 200 and state["draining"] and state["status"] == "draining"
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await pod.http.ws_connect(pod.ws_url)
            assert info.value.status == 503
            await idle.send_json({"type": "frame", "model_name": "demo", "frame_id": 0})
            assert (await idle.receive_json())["code"] == "UNAVAILABLE"
            assert not stopping.done()  # it waits for the session in flight
            await ws.send_bytes(pcm[len(pcm) // 2 :])
            await ws.send_json({"type": "audio_end"})
            received += await ws_replies(ws)  # the session in flight runs to its end
            frames = audio.frame_count(len(pcm) // 2)
            assert [m.get("frame_id") for m in received] == [*range(frames), None]
            assert (received[-1]["type"], received[-1]["frames"]) == ("end", frames)
            closing = await idle.receive()  # then open sockets are closed: going away
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.GOING_AWAY
            await stopping
        with pytest.raises(aiohttp.ClientConnectionError):
            await pod.call("GET", "/health", pod.anon)
        assert pod.server.data_plane.metrics.sample("lipsync_inflight_requests") == 0


async def test_a_revoked_key_stops_working_on_an_open_socket(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\nleaving-key\n")
    models = models_dir_with(tmp_path / "models", "demo-1")
    async with running(settings_for(models, api_keys_file=keys)) as pod:
        async with pod.anon.ws_connect(pod.ws_url, headers={"X-API-Key": "leaving-key"}) as ws:
            await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 1})
            assert (await ws.receive_json())["type"] == "frame"
            keys.write_text(f"{KEY}\n")  # the Secret is rotated; the file is re-read within 2 s

            async def refused() -> dict | None:
                await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 1})
                reply = await ws.receive_json()
                return reply if reply["type"] == "error" else None

            reply = await wait_until_async(refused, what="the revoked key to be refused", poll=0.1)
            assert reply["code"] == "UNAUTHENTICATED" and "not valid" in reply["message"]


async def test_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    models = models_dir_with(tmp_path / "models", "demo-1")
    server = await InferencePod(settings_for(models, tls_cert=cert, tls_key=key)).start()
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"{LOOPBACK}:{server.gateway.port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"https://{url}/generate/frame", json={"model_name": "demo", "frame_id": 1},
                                    ssl=trusted) as response:
                assert response.status == 200 and (await response.json())["width"] == 48
            async with session.ws_connect(f"wss://{url}/ws", ssl=trusted) as ws:
                await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 2})
                assert (await ws.receive_json())["frame_id"] == 2
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://{url}/health") as response:
                    await response.read()
    finally:
        await server.stop(grace_s=1)


async def test_http_port_zero_disables_the_gateway_and_a_taken_port_is_an_error(tmp_path):
    models = models_dir_with(tmp_path / "models", "demo-1")
    server = await InferencePod(settings_for(models, http_port=0)).start()
    try:
        assert server.gateway is None
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}") as channel:
            frame = await pb_grpc.LipSyncStub(channel).GenerateFrame(pb.GenerateFrameRequest(model="demo"))
            assert frame.width == 48
    finally:
        await server.stop(grace_s=1)
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        server = InferencePod(settings_for(models, http_port=taken.getsockname()[1]))
        with pytest.raises(Unavailable, match=r"cannot listen on .*\(HTTP gateway, --http-port\).*in use"):
            await server.start()
        await server.stop(grace_s=0)


@pytest.mark.timeout(420)  # up to 240 s for a new process to start on a busy machine, then the SIGTERM
async def test_serve_command_serves_http_and_stops_on_sigterm(tmp_path):
    port, http_port = free_port(), free_port()
    models = models_dir_with(tmp_path / "models", "demo-1")
    env = dict(os.environ, LIPSYNC_HOST=LOOPBACK, LIPSYNC_PORT=str(port), LIPSYNC_METRICS_PORT="0",
               LIPSYNC_HTTP_PORT=str(http_port), LIPSYNC_MODELS_DIR=str(models), LIPSYNC_PRELOAD="demo",
               LIPSYNC_SHUTDOWN_GRACE_S="5", OMP_NUM_THREADS="1")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "inference_pod.cli", "serve", env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{http_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def healthy() -> bool:  # refused until the port opens, 503 "starting" while the preload runs
                assert proc.returncode is None, "the pod exited"
                with contextlib.suppress(aiohttp.ClientConnectionError, asyncio.TimeoutError):
                    async with http.get(url + "/health") as response:
                        if response.status == 200:
                            assert await response.json() == {"status": "healthy"}
                            return True
                        assert (response.status, await response.json()) == (503, {"status": "starting"})
                return False

            # A new process imports torch and loads the model: minutes on a busy machine, seconds on a quiet one.
            await wait_until_async(healthy, what="the pod's /health to answer 200", timeout=240, poll=0.2)
            async with http.post(url + "/generate/frame", json={"model_name": "demo", "frame_id": 3}) as response:
                frame = await response.json()
            assert response.status == 200 and frame["width"] == 48 and not frame["auto_loaded"]  # preloaded
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert f"HTTP gateway on http://{LOOPBACK}:{http_port}" in output.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
