"""A pod's paste mode (``lipsync serve --paste``): a feathered pod answers the same feathered frame over gRPC,
HTTP and the WebSocket, and pods that paste differently share one Redis without serving each other's frames."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import aiohttp
import grpc
import pytest
from serving_support import LOOPBACK, RedisServer, free_port, models_dir_with, package

from inference_pod.app import Pod
from inference_pod.core.engine import Engine
from inference_pod.package import open_package
from inference_pod.serving.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.usefixtures("one_torch_thread")]
FRAME = 5


@contextlib.asynccontextmanager
async def running(models_dir, **overrides):
    settings = Settings(**{"host": LOOPBACK, "port": 0, "metrics_port": 0, "http_port": free_port(),
                           "models_dir": models_dir, "max_batch": 4, "encode_threads": 2, **overrides})
    server = await Pod(settings).start()
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}")
    http = aiohttp.ClientSession(f"http://{LOOPBACK}:{server.gateway.port}")
    try:
        yield pb_grpc.LipSyncStub(channel), http
    finally:
        await http.close()
        await channel.close()
        await server.stop(grace_s=5)


def expected_jpegs(tmp_path) -> dict[str, bytes]:
    """Frame FRAME of the demo's default track as a full-frame JPEG (quality 90), per paste, from the engine."""
    character = open_package(package("demo-1"), cache_dir=tmp_path / "engine-cache")
    out = {}
    for paste in ("exact", "feather"):
        engine = Engine.from_package(character, max_batch=1, paste=paste)
        template = engine.template_index(FRAME)
        prediction = engine.predict([template], engine.windows(engine.default_features, [FRAME]))[0]
        out[paste] = engine.full_frame_jpeg(template, prediction, 90).data
        engine.close()
    return out


async def test_a_feathered_pod_answers_the_same_frame_on_every_door(tmp_path):
    expected = expected_jpegs(tmp_path)
    assert expected["feather"] != expected["exact"]
    async with running(models_dir_with(tmp_path / "models", "demo-1"), paste="feather") as (stub, http):
        by_grpc = await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=FRAME))
        async with http.post("/generate/frame", json={"model_name": "demo", "frame_id": FRAME}) as response:
            by_http = await response.json()
        async with http.ws_connect("/ws") as ws:
            await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": FRAME})
            by_ws = await asyncio.wait_for(ws.receive_json(), 60)
    assert by_grpc.image == expected["feather"]
    assert base64.b64decode(by_http["frame"]) == expected["feather"]
    assert by_ws["type"] == "frame" and base64.b64decode(by_ws["frame"]) == expected["feather"]


async def test_pods_that_paste_differently_share_a_redis_without_mixing_frames(tmp_path):
    expected = expected_jpegs(tmp_path)
    redis = RedisServer(tmp_path).start()
    try:
        models = models_dir_with(tmp_path / "models", "demo-1")
        request = pb.GenerateFrameRequest(model="demo", frame_id=FRAME)
        async with running(models, redis_url=redis.url) as (stub, _):
            first = await stub.GenerateFrame(request)
            again = await stub.GenerateFrame(request)
        assert (first.image, first.cached, again.cached) == (expected["exact"], False, True)
        async with running(models, redis_url=redis.url, paste="feather") as (stub, _):
            feathered = await stub.GenerateFrame(request)
        assert (feathered.image, feathered.cached) == (expected["feather"], False)
    finally:
        redis.stop()
