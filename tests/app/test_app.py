"""The Pod and its front doors: the one error mapping (a bug is INTERNAL with generic text on every front door;
its details go to the log). The import rules between layers are import-linter's contracts (pyproject.toml)."""

from __future__ import annotations

import contextlib
import logging

import aiohttp
import grpc
import pytest
from serving_support import LOOPBACK, free_port, models_dir_with

from inference_pod.app import Pod
from inference_pod.core.engine import Engine
from inference_pod.errors import INTERNAL_MESSAGE
from inference_pod.serving.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc


class BrokenEngine:
    """A real engine whose device step fails with a bug's exception, carrying text that must not leak."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def predict(self, template_ids, audio_windows):
        raise RuntimeError("secret detail from /srv/internal/path")


@pytest.mark.usefixtures("one_torch_thread")
async def test_a_bug_is_internal_with_generic_text_on_every_front_door(tmp_path, caplog):
    models = models_dir_with(tmp_path / "models", "demo-1")
    settings = Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models,
                        max_batch=4, encode_threads=1)
    pod = await Pod(settings, engine_factory=lambda package: BrokenEngine(Engine.from_package(package))).start()
    try:
        with caplog.at_level(logging.ERROR):
            async with grpc.aio.insecure_channel(f"{LOOPBACK}:{pod.port}") as channel:
                stub = pb_grpc.LipSyncStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=1))
                assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
                batch = await stub.GenerateBatch(pb.GenerateBatchRequest(items=[pb.GenerateFrameRequest(
                    model="demo", frame_id=2)]))
                assert (batch.results[0].error.code, batch.results[0].error.message) == ("INTERNAL",
                                                                                          INTERNAL_MESSAGE)
            async with aiohttp.ClientSession() as http:
                url = f"http://{LOOPBACK}:{pod.gateway.port}"
                async with http.post(url + "/generate/frame", json={"model_name": "demo", "frame_id": 3}) as reply:
                    assert reply.status == 500
                    assert await reply.json() == {"success": False, "error": INTERNAL_MESSAGE, "code": "INTERNAL"}
                async with http.ws_connect(url + "/ws") as ws:
                    await ws.send_json({"type": "frame", "model_name": "demo", "frame_id": 4})
                    assert await ws.receive_json() == {"type": "error", "code": "INTERNAL",
                                                       "message": INTERNAL_MESSAGE}
        # The details are for the operator: in the log, with the traceback.
        logged = [r for r in caplog.records if r.exc_info and "secret detail" in str(r.exc_info[1])]
        assert len(logged) >= 3
    finally:
        with contextlib.suppress(Exception):
            await pod.stop(grace_s=1)
