"""A batch whose client gave up stops: the HTTP connection closed, or the gRPC call cancelled.

A batch of 4,096 items (the limit) can outlast a client's timeout on a small machine; the pod used to go on
rendering every frame for nobody, holding the device from the clients still waiting. Frames are counted by
the pod's own metric; the cache is off, so every item is the model's work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import aiohttp
import grpc
import pytest
import pytest_asyncio
from conditions import wait_until_async
from serving_support import LOOPBACK, free_port, models_dir_with

from inference_pod.app import Pod
from inference_pod.serving.data_plane import MAX_BATCH_ITEMS
from inference_pod.serving.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("one_torch_thread")]
TRACK_FRAMES = 25  # the test package's default track: 1 s at 25 fps


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pod(tmp_path_factory):
    models = models_dir_with(tmp_path_factory.mktemp("abandoned") / "models", "demo-1")
    settings = Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models,
                        max_batch=1, max_batch_delay_ms=0, encode_threads=1, frame_cache_ttl=0, preload=["demo"],
                        shutdown_grace_s=5)
    server = await Pod(settings).start()
    yield server
    await server.stop(grace_s=5)


def generated(pod: Pod) -> float:
    return pod.data_plane.metrics.sample("lipsync_frames_generated_total", {"model": "demo", "source": "model"})


async def abandon(pod: Pod, call: asyncio.Future, cancel: Callable[[], object]) -> float:
    """Frames the model rendered for ``call`` once it started, its client gave up, and the pod let it go."""
    before = generated(pod)
    await wait_until_async(lambda: generated(pod) >= before + 8, what="the batch to start", timeout=120)
    cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call
    await wait_until_async(lambda: pod.data_plane.inflight == 0, what="the abandoned batch to stop",
                           timeout=120)
    return generated(pod) - before


async def test_a_batch_stops_when_its_http_client_disconnects(pod):
    body = {"requests": [{"model_name": "demo", "frame_id": i % TRACK_FRAMES} for i in range(MAX_BATCH_ITEMS)]}
    async with aiohttp.ClientSession() as session:
        post = asyncio.ensure_future(session.post(f"http://{LOOPBACK}:{pod.gateway.port}/generate/batch", json=body))
        rendered = await abandon(pod, post, post.cancel)  # a client timeout does this: the connection closes
    assert rendered < MAX_BATCH_ITEMS / 2, rendered


async def test_a_batch_stops_when_its_grpc_call_is_cancelled(pod):
    items = [pb.GenerateFrameRequest(model="demo", frame_id=i % TRACK_FRAMES) for i in range(MAX_BATCH_ITEMS)]
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{pod.port}") as channel:
        call = pb_grpc.LipSyncStub(channel).GenerateBatch(pb.GenerateBatchRequest(items=items))
        rendered = await abandon(pod, asyncio.ensure_future(call), call.cancel)
    assert rendered < MAX_BATCH_ITEMS / 2, rendered
