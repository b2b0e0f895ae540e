"""The gRPC server on loopback with demo packages: every method, every status code, batching, caching in a real
Redis (and its outage), a real HTTP registry, API keys, TLS, reflection, health and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from conditions import wait_until_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_support import (
    LOOPBACK,
    RedisServer,
    StaticRegistry,
    free_port,
    models_dir_with,
    package,
    speech_pcm16,
    wav_bytes,
)

from inference_pod.app import Pod
from inference_pod.core import audio
from inference_pod.core.encoding import decode_image
from inference_pod.core.engine import Engine
from inference_pod.errors import Unavailable
from inference_pod.package import open_package
from inference_pod.serving.pipeline import AudioInput
from inference_pod.serving.registry import publish
from inference_pod.serving.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("one_torch_thread")]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RAW_PREDICTION = pb.OutputOptions(format=pb.IMAGE_FORMAT_RAW, region=pb.OUTPUT_REGION_PREDICTION)
RAW_FULL = pb.OutputOptions(format=pb.IMAGE_FORMAT_RAW, region=pb.OUTPUT_REGION_FULL_FRAME)
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]  # batches of raw frames are large


def settings_for(models_dir: Path, **overrides) -> Settings:
    values = {"host": LOOPBACK, "port": 0, "metrics_port": 0, "http_port": 0, "models_dir": models_dir, "max_batch": 8,
              "max_batch_delay_ms": 20, "encode_threads": 2, "shutdown_grace_s": 10}
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(settings: Settings):
    server = await Pod(settings).start()
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}", options=CHANNEL_OPTIONS)
    try:
        yield server, pb_grpc.LipSyncStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        await channel.close()
        await server.stop(grace_s=5)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server-registry")
    publish(package("other-1"), root)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pod(tmp_path_factory, registry_dir):
    """One shared pod: demo and twin on disk, other in an HTTP registry, in-process cache."""
    registry = StaticRegistry(registry_dir)
    models = models_dir_with(tmp_path_factory.mktemp("pod") / "models", "demo-1", "twin-1")
    async with running(settings_for(models, registry_url=registry.url)) as (server, stub, health):
        yield server, stub, health
    registry.close()


@pytest_asyncio.fixture(loop_scope="module")
async def own_pod(tmp_path, registry_dir):
    """A pod of the test's own (demo on disk, other in an HTTP registry), for tests that count from zero: an
    empty cache, no model loaded yet, no traffic counted."""
    registry = StaticRegistry(registry_dir)
    models = models_dir_with(tmp_path / "models", "demo-1")
    try:
        async with running(settings_for(models, registry_url=registry.url)) as (server, stub, health):
            yield server, stub, health
    finally:
        registry.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    """The demo model, built here independently of the server, to check the server's numbers against."""
    return Engine.from_package(open_package(package("demo-1"), cache_dir=tmp_path_factory.mktemp("ref")))


async def expect_status(code: grpc.StatusCode, call, match: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    return info.value.details()


def prediction(frame: pb.Frame) -> np.ndarray:
    return decode_image(frame.image, "raw", frame.width, frame.height).astype(int)


# ------------------------------------------------------------------------------------------ frames


async def test_generate_frame_default_track_is_the_engines(own_pod, engine):
    server, stub, _ = own_pod
    for frame_id in (0, 7):
        pred = await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=frame_id, output=RAW_PREDICTION))
        full = await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=frame_id, output=RAW_FULL))
        template = engine.template_index(frame_id)
        expected = engine.predict([template], engine.windows(engine.default_features, [frame_id]))[0]
        assert (pred.width, pred.height, pred.template_id, pred.model_version) == (320, 320, template, "1")
        assert np.abs(prediction(pred) - expected).max() <= 1
        # Full frame: the prediction pasted into the template at its crop box.
        assert (full.width, full.height) == (48, 48)
        np.testing.assert_array_equal(prediction(full), engine.composite(template, prediction(pred).astype(np.uint8)))
        box = engine.crop_box(template)
        assert (full.crop_box.x1, full.crop_box.y1, full.crop_box.x2, full.crop_box.y2, full.crop_box.size) == (
            box.x1, box.y1, box.x2, box.y2, box.size)
        assert not pred.cached and pred.timings.batch_size == 1 and pred.timings.total_ms > 0


async def test_audio_as_a_file_or_as_pcm_gives_the_engines_frames(pod, engine):
    server, stub, _ = pod
    pcm = speech_pcm16(1.2, seed=11)
    features = engine.track_features(audio.pcm16_to_float(pcm, 16000))
    by_file = await stub.GenerateFrame(pb.GenerateFrameRequest(
        model="demo", frame_id=9, audio=pb.Audio(file=wav_bytes(pcm)), output=RAW_PREDICTION))
    by_pcm = await stub.GenerateFrame(pb.GenerateFrameRequest(
        model="demo", frame_id=9, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=pcm, sample_rate=16000)),
        output=RAW_PREDICTION))
    expected = engine.predict([engine.template_index(9)], engine.windows(features, [9]))[0]
    assert np.abs(prediction(by_file) - expected).max() <= 1
    assert np.abs(prediction(by_pcm) - expected).max() <= 1
    # The tiny random model barely reacts to audio, so check the features the server computed directly.
    model = await server.data_plane.store.get("demo")
    key = server.data_plane.cache.features_key(model.encoder_id, AudioInput(pcm, "pcm16", 16000).digest)
    np.testing.assert_allclose(await server.data_plane.cache.get_features(key), features, atol=1e-5)
    # Frames past the default track's end exist when the audio is longer.
    track_frames = len(features)
    last = await stub.GenerateFrame(pb.GenerateFrameRequest(
        model="demo", frame_id=track_frames - 1, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=pcm, sample_rate=16000))))
    assert last.frame_id == track_frames - 1


async def test_formats_and_the_frame_cache(own_pod):
    server, stub, _ = own_pod
    request = pb.GenerateFrameRequest(model="demo", frame_id=3)
    first = await stub.GenerateFrame(request)
    again = await stub.GenerateFrame(request)
    assert not first.cached and again.cached and again.image == first.image
    assert first.format == pb.IMAGE_FORMAT_JPEG and first.image[:2] == b"\xff\xd8"
    assert decode_image(first.image, "jpeg").shape == (48, 48, 3)
    png = await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=3,
                                                           output=pb.OutputOptions(format=pb.IMAGE_FORMAT_PNG)))
    raw = await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=3, output=RAW_FULL))
    assert not png.cached  # another encoding is another cache entry
    np.testing.assert_array_equal(decode_image(png.image, "png"), prediction(raw))
    small = await stub.GenerateFrame(pb.GenerateFrameRequest(
        model="demo", frame_id=3, output=pb.OutputOptions(jpeg_quality=10)))
    assert len(small.image) < len(first.image)


BAD_REQUESTS = [
    (grpc.StatusCode.NOT_FOUND, pb.GenerateFrameRequest(model="nobody", frame_id=0), "nobody"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(model="../etc", frame_id=0), "model name"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(model="", frame_id=0), "model name"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(model="demo", frame_id=-1), "frame id"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(model="demo", frame_id=10**12), "frame id"),
    (grpc.StatusCode.INVALID_ARGUMENT,
     pb.GenerateFrameRequest(model="demo", frame_id=0, audio=pb.Audio(file=b"definitely not audio")), "audio"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(model="demo", frame_id=0, audio=pb.Audio()),
     "neither"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(
        model="demo", frame_id=0, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=b"\x00\x00" * 8000, sample_rate=0))),
     "sample rate"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(
        model="demo", frame_id=0, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=b"\x00" * 8001, sample_rate=16000))),
     "PCM16"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(
        model="demo", frame_id=0, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=b"\x00\x00" * 100, sample_rate=16000))),
     "too short"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(
        model="demo", frame_id=0, output=pb.OutputOptions(format=99)), "format"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(
        model="demo", frame_id=0, output=pb.OutputOptions(region=42)), "region"),
    (grpc.StatusCode.INVALID_ARGUMENT, pb.GenerateFrameRequest(
        model="demo", frame_id=0, output=pb.OutputOptions(jpeg_quality=101)), "quality"),
]


@pytest.mark.parametrize("code, request_message, match", BAD_REQUESTS)
async def test_bad_requests_get_their_status(pod, code, request_message, match):
    _, stub, _ = pod
    await expect_status(code, lambda: stub.GenerateFrame(request_message), match)


async def test_bad_input_never_harms_other_requests(pod):
    """A stream of good frames runs while every kind of bad request hits the same model."""
    _, stub, health = pod
    good = stub.StreamFrames(pb.StreamFramesRequest(model="demo", first_frame=0, last_frame=11, output=RAW_FULL))

    async def bad(message):
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.GenerateFrame(message)

    results = await asyncio.gather(
        *(bad(message) for _, message, _ in BAD_REQUESTS * 2),
        *(stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=i)) for i in range(4)),
        _collect(good))
    assert [f.frame_id for f in results[-1]] == list(range(12))
    assert all(r.width == 48 for r in results[-5:-1])
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING


async def _collect(call) -> list:
    return [message async for message in call]


async def test_generate_batch_items_fail_alone(pod):
    _, stub, _ = pod
    items = [pb.GenerateFrameRequest(model="demo", frame_id=i, output=RAW_PREDICTION) for i in range(6)]
    items.insert(2, pb.GenerateFrameRequest(model="nobody", frame_id=0))
    items.insert(4, pb.GenerateFrameRequest(model="demo", frame_id=10**6))
    items.append(pb.GenerateFrameRequest(model="twin", frame_id=1))
    response = await stub.GenerateBatch(pb.GenerateBatchRequest(items=items))
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["frame", "frame", "error", "frame", "error", "frame", "frame", "frame", "frame"]
    assert response.results[2].error.code == "NOT_FOUND" and "nobody" in response.results[2].error.message
    assert response.results[4].error.code == "INVALID_ARGUMENT" and "outside" in response.results[4].error.message
    frames = [r.frame for r in response.results if r.HasField("frame")]
    assert [f.frame_id for f in frames] == [0, 1, 2, 3, 4, 5, 1]
    assert [f.model for f in frames][-1] == "twin"
    assert max(f.timings.batch_size for f in frames) > 1  # the items went to the device together
    empty = await stub.GenerateBatch(pb.GenerateBatchRequest())
    assert list(empty.results) == []
    # A malformed item fails the whole request, naming it, as over HTTP; nothing is rendered.
    for bad, match in [(pb.GenerateFrameRequest(model="demo", frame_id=-3), "items[1]: frame id -3 is negative"),
                       (pb.GenerateFrameRequest(model="Demo!", frame_id=0), "items[1]: model name"),
                       (pb.GenerateFrameRequest(model="demo", output=pb.OutputOptions(format=99)), "items[1]")]:
        await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda bad=bad: stub.GenerateBatch(
            pb.GenerateBatchRequest(items=[items[0], bad])), match)


async def test_concurrent_requests_are_batched(pod):
    server, stub, _ = pod
    before_batches = server.data_plane.metrics.sample("lipsync_batch_size_count", {"model": "twin"})
    before_items = server.data_plane.metrics.sample("lipsync_batch_size_sum", {"model": "twin"})
    frames = await asyncio.gather(*(stub.GenerateFrame(pb.GenerateFrameRequest(
        model="twin", frame_id=i, output=RAW_PREDICTION)) for i in range(2, 12)))
    batches = server.data_plane.metrics.sample("lipsync_batch_size_count", {"model": "twin"}) - before_batches
    items = server.data_plane.metrics.sample("lipsync_batch_size_sum", {"model": "twin"}) - before_items
    assert items == 10 and batches < 10
    assert max(f.timings.batch_size for f in frames) > 1


# ------------------------------------------------------------------------------------------ streams


async def test_stream_frames(pod, engine):
    _, stub, _ = pod
    frames = await _collect(stub.StreamFrames(pb.StreamFramesRequest(model="demo", first_frame=2, last_frame=6)))
    assert [f.frame_id for f in frames] == [2, 3, 4, 5, 6]
    whole = await _collect(stub.StreamFrames(pb.StreamFramesRequest(model="demo", first_frame=18)))
    track = len(engine.default_features)
    assert [f.frame_id for f in whole] == list(range(18, track))  # to the end of the default track
    paced = await _collect(stub.StreamFrames(pb.StreamFramesRequest(
        model="demo", first_frame=0, last_frame=3, realtime=True, fps=200)))
    assert [f.frame_id for f in paced] == [0, 1, 2, 3]
    pcm = speech_pcm16(0.6, seed=2)
    with_audio = await _collect(stub.StreamFrames(pb.StreamFramesRequest(
        model="demo", first_frame=0, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=pcm, sample_rate=16000)))))
    assert len(with_audio) == audio.frame_count(len(pcm) // 2)


@pytest.mark.parametrize("request_message, match", [
    (pb.StreamFramesRequest(model="demo", first_frame=5, last_frame=2), "before"),
    (pb.StreamFramesRequest(model="demo", first_frame=0, last_frame=1000), "frame id"),
    (pb.StreamFramesRequest(model="demo", first_frame=-1), "frame id"),
    (pb.StreamFramesRequest(model="demo", realtime=True, fps=-5), "fps"),
])
async def test_stream_frames_bad_ranges(pod, request_message, match):
    _, stub, _ = pod
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.StreamFrames(request_message), match)


def live_requests(model: str, pcm: bytes, chunk: int = 1280, rate: int = 16000):
    async def gen():
        yield pb.StreamAudioRequest(config=pb.StreamAudioConfig(model=model, sample_rate=rate,
                                                                output=RAW_PREDICTION))
        for start in range(0, len(pcm), chunk):
            yield pb.StreamAudioRequest(pcm16=pcm[start : start + chunk])

    return gen()


async def test_stream_audio_gives_the_same_frames_as_the_whole_file(pod):
    _, stub, _ = pod
    pcm = speech_pcm16(1.0, seed=5)
    live = await _collect(stub.StreamAudio(live_requests("demo", pcm)))
    assert [f.frame_id for f in live] == list(range(audio.frame_count(len(pcm) // 2)))
    whole = await stub.GenerateBatch(pb.GenerateBatchRequest(items=[pb.GenerateFrameRequest(
        model="demo", frame_id=f.frame_id, audio=pb.Audio(pcm16=pb.Pcm16Audio(data=pcm, sample_rate=16000)),
        output=RAW_PREDICTION) for f in live]))
    for got, expected in zip(live, whole.results, strict=True):
        assert got.template_id == expected.frame.template_id
        assert np.abs(prediction(got) - prediction(expected.frame)).max() <= 2


async def test_a_huge_live_message_is_worked_in_short_steps(pod, engine):
    """One message of many seconds: its first frame comes after one step's work, not the whole message's (and
    each step is a point where a client that has left stops the work)."""
    import time

    from inference_pod.core.live_features import LiveTrack

    _, stub, _ = pod
    await stub.LoadModel(pb.LoadModelRequest(name="demo"))
    pcm = speech_pcm16(16.0, seed=11)
    started = time.perf_counter()
    LiveTrack(engine, 16000).push(pcm)  # the whole message's feature work, done here for scale
    whole_s = time.perf_counter() - started

    async def one_message():
        yield pb.StreamAudioRequest(config=pb.StreamAudioConfig(model="demo", sample_rate=16000,
                                                                output=RAW_PREDICTION))
        yield pb.StreamAudioRequest(pcm16=pcm)
        await asyncio.Event().wait()  # the client stays, sending nothing more

    call = stub.StreamAudio(one_message())
    started = time.perf_counter()
    first = await call.read()
    first_s = time.perf_counter() - started
    call.cancel()
    assert first.frame_id == 0
    assert first_s < 0.5 * whole_s, f"first frame after {first_s:.2f} s; the whole message's work is {whole_s:.2f} s"


async def test_stream_audio_without_a_sample_rate_is_16_khz_as_on_the_websocket(pod):
    _, stub, _ = pod
    pcm = speech_pcm16(0.5, seed=6)
    unset = await _collect(stub.StreamAudio(live_requests("demo", pcm, rate=0)))
    explicit = await _collect(stub.StreamAudio(live_requests("demo", pcm, rate=16000)))
    assert [f.frame_id for f in unset] == [f.frame_id for f in explicit] == list(range(audio.frame_count(len(pcm) // 2)))
    assert [f.image for f in unset] == [f.image for f in explicit]


async def test_stream_audio_errors(pod):
    _, stub, _ = pod

    async def no_config():
        yield pb.StreamAudioRequest(pcm16=b"\x00\x00")

    async def two_configs():
        yield pb.StreamAudioRequest(config=pb.StreamAudioConfig(model="demo", sample_rate=16000))
        yield pb.StreamAudioRequest(config=pb.StreamAudioConfig(model="demo", sample_rate=16000))

    async def empty_message():
        yield pb.StreamAudioRequest(config=pb.StreamAudioConfig(model="demo", sample_rate=16000))
        yield pb.StreamAudioRequest()

    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.StreamAudio(no_config()), "config")
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.StreamAudio(two_configs()), "config")
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.StreamAudio(empty_message()), "empty")
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                        lambda: stub.StreamAudio(live_requests("demo", b"\x00\x00" * 50)), "too short")
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                        lambda: stub.StreamAudio(live_requests("demo", b"\x00\x00" * 50, rate=5)), "sample rate")
    await expect_status(grpc.StatusCode.NOT_FOUND, lambda: stub.StreamAudio(live_requests("nobody", b"\0\0")))


# ------------------------------------------------------------------------------------------ models


async def test_models_load_unload_and_per_model_health(pod, engine):
    server, stub, health = pod

    async def status(service: str):
        return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

    await stub.LoadModel(pb.LoadModelRequest(name="demo"))
    assert await status("") == SERVING and await status("lipsync.v1.LipSync") == SERVING
    assert await status("demo") == SERVING
    loaded = await stub.LoadModel(pb.LoadModelRequest(name="demo"))
    assert loaded.source == "memory" and loaded.model.state == pb.MODEL_STATE_LOADED
    assert loaded.model.default_track_frames == len(engine.default_features)
    assert loaded.model.frame_count == engine.num_templates == 6

    assert (await stub.UnloadModel(pb.UnloadModelRequest(name="demo"))).unloaded
    assert not (await stub.UnloadModel(pb.UnloadModelRequest(name="demo"))).unloaded
    assert await status("demo") == NOT_SERVING
    models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert models["demo"].state == pb.MODEL_STATE_AVAILABLE and models["demo"].location == "store"

    reloaded = await stub.LoadModel(pb.LoadModelRequest(name="demo", version="1"))
    assert reloaded.source == "store" and await status("demo") == SERVING
    await expect_status(grpc.StatusCode.NOT_FOUND, lambda: stub.LoadModel(pb.LoadModelRequest(name="demo", version="9")))
    await expect_status(grpc.StatusCode.NOT_FOUND, lambda: stub.UnloadModel(pb.UnloadModelRequest(name="nobody")))
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.LoadModel(pb.LoadModelRequest(name="A/B")))
    await expect_status(grpc.StatusCode.NOT_FOUND, lambda: health.Check(health_pb2.HealthCheckRequest(service="nobody")))


async def test_registry_models_load_on_demand(own_pod):
    server, stub, health = own_pod
    listing = await stub.ListRegistry(pb.ListRegistryRequest())
    assert listing.registry_url == server.data_plane.registry.url
    assert [(p.name, p.version) for p in listing.packages] == [("other", "1")]
    assert listing.packages[0].url.startswith("http://127.0.0.1") and len(listing.packages[0].sha256) == 64
    assert "other" not in [m.name for m in server.data_plane.store.resident]
    frame = await stub.GenerateFrame(pb.GenerateFrameRequest(model="other", frame_id=2))
    assert frame.model == "other"
    assert server.data_plane.metrics.sample("lipsync_model_loads_total",
                                 {"model": "other", "source": "registry", "result": "ok"}) == 1
    assert (await health.Check(health_pb2.HealthCheckRequest(service="other"))).status == SERVING


async def test_features_are_shared_by_models_with_the_same_encoder(pod):
    server, stub, _ = pod
    pcm = speech_pcm16(0.8, seed=21)
    request_audio = pb.Audio(pcm16=pb.Pcm16Audio(data=pcm, sample_rate=16000))
    hits = lambda: server.data_plane.metrics.sample("lipsync_cache_requests_total", {"kind": "features", "result": "hit"})  # noqa: E731
    misses = lambda: server.data_plane.metrics.sample("lipsync_cache_requests_total", {"kind": "features", "result": "miss"})  # noqa: E731
    h0, m0 = hits(), misses()
    await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=1, audio=request_audio))
    assert (hits() - h0, misses() - m0) == (0, 1)
    await stub.GenerateFrame(pb.GenerateFrameRequest(model="twin", frame_id=1, audio=request_audio))
    assert (hits() - h0, misses() - m0) == (1, 1)  # twin has demo's encoder: no recomputation
    await stub.GenerateFrame(pb.GenerateFrameRequest(model="other", frame_id=1, audio=request_audio))
    assert misses() - m0 == 2  # other's encoder differs: its own features


async def test_stats_and_metrics_count_exactly_the_traffic(own_pod):
    """On a pod of its own, counted from zero: each call of a known mix shows up once, under its outcome."""
    server, stub, _ = own_pod
    request = pb.GenerateFrameRequest(model="demo", frame_id=0)
    first, again = await stub.GenerateFrame(request), await stub.GenerateFrame(request)
    assert (first.cached, again.cached) == (False, True)
    await expect_status(grpc.StatusCode.NOT_FOUND, lambda: stub.GenerateFrame(
        pb.GenerateFrameRequest(model="nobody", frame_id=0)))
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.GenerateFrame(
        pb.GenerateFrameRequest(model="demo", frame_id=-1)))
    await stub.GenerateFrame(pb.GenerateFrameRequest(model="other", frame_id=1))  # a second resident model
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.server_version and stats.device == "cpu" and stats.max_batch == 8 and not stats.draining
    assert stats.cache.backend == "memory" and stats.cache.hits == 1
    per_model = {m.name: m for m in stats.models}
    assert (per_model["demo"].frames_generated, per_model["demo"].batches) == (1, 1)
    assert (per_model["other"].frames_generated, per_model["other"].batches) == (1, 1)
    assert stats.models_resident == len(stats.models) == 2 and stats.models_memory_bytes > 0
    assert stats.inflight_requests == 0  # calls other than this one: none
    m = server.data_plane.metrics
    assert m.sample("lipsync_inflight_requests") == 0
    assert m.sample("lipsync_request_duration_seconds_count", {"method": "GenerateFrame", "code": "OK"}) == 3
    assert m.sample("lipsync_request_duration_seconds_count", {"method": "GenerateFrame", "code": "NOT_FOUND"}) == 1
    assert m.sample("lipsync_request_duration_seconds_count",
                    {"method": "GenerateFrame", "code": "INVALID_ARGUMENT"}) == 1
    assert m.sample("lipsync_frames_generated_total", {"model": "demo", "source": "cache"}) == 1
    assert m.sample("lipsync_frames_generated_total", {"model": "demo", "source": "model"}) == 1
    assert m.sample("lipsync_queue_depth", {"model": "demo"}) == 0
    assert m.sample("lipsync_models_resident") == stats.models_resident
    assert m.sample("lipsync_device_memory_bytes", {"kind": "models"}) == stats.models_memory_bytes


async def test_reflection_lists_the_services(pod):
    server, _, _ = pod
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="lipsync.v1.LipSync")

        answers = await _collect(stub.ServerReflectionInfo(ask()))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"lipsync.v1.LipSync", "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto


# ------------------------------------------------------------------------------------------ pods of their own


async def test_full_queues_are_resource_exhausted(tmp_path):
    models = models_dir_with(tmp_path / "models", "demo-1")
    settings = settings_for(models, max_queue=2, max_batch=8, max_batch_delay_ms=300, preload=["demo"])
    async with running(settings) as (server, stub, _):
        calls = [stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=i)) for i in range(6)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        served = [o for o in outcomes if isinstance(o, pb.Frame)]
        # a lone first request may go straight to the idle device; then two wait (max_queue) and the rest
        # are turned away while the 300 ms fill wait holds them
        assert len(served) + len(rejected) == 6 and 2 <= len(served) <= 3 and len(rejected) >= 3
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected)
        assert "retry" in rejected[0].details()
        assert (await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=5))).frame_id == 5


async def test_graceful_shutdown(tmp_path):
    """A call in flight when SIGTERM comes runs to its end while everything new is refused. The call in flight
    is a live audio stream that the client holds open (it has not sent all its audio), so it is still in
    flight at every check below however slow the machine is; then the client finishes it."""
    models = models_dir_with(tmp_path / "models", "demo-1")
    # The grace is longer than the checks below can take on a busy machine: the call ends when the client
    # ends it, not when the grace runs out (that cut-off would cancel it).
    server = await Pod(settings_for(models, preload=["demo"], shutdown_grace_s=240)).start()
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}")
    stub, health = pb_grpc.LipSyncStub(channel), health_pb2_grpc.HealthStub(channel)
    pcm = speech_pcm16(1.0, seed=5)
    rest_of_the_audio = asyncio.Event()

    async def held_open():
        yield pb.StreamAudioRequest(config=pb.StreamAudioConfig(model="demo", sample_rate=16000))
        yield pb.StreamAudioRequest(pcm16=pcm[: len(pcm) // 2])
        await rest_of_the_audio.wait()
        yield pb.StreamAudioRequest(pcm16=pcm[len(pcm) // 2 :])

    stream = stub.StreamAudio(held_open())
    received = [await stream.read()]
    assert received[0].frame_id == 0
    stopping = asyncio.ensure_future(server.stop())  # what SIGTERM does
    await wait_until_async(lambda: server.data_plane.draining, what="the pod to start draining")
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
    assert (await health.Check(health_pb2.HealthCheckRequest(service="demo"))).status == NOT_SERVING
    await expect_status(grpc.StatusCode.UNAVAILABLE, lambda: stub.GenerateFrame(
        pb.GenerateFrameRequest(model="demo", frame_id=0)), "shutting down")
    assert not stopping.done()  # it waits for the call in flight
    rest_of_the_audio.set()
    while (frame := await stream.read()) != grpc.aio.EOF:  # the call in flight runs to its end
        received.append(frame)
    assert [f.frame_id for f in received] == list(range(audio.frame_count(len(pcm) // 2)))
    await stopping
    assert server.data_plane.metrics.sample("lipsync_inflight_requests") == 0
    await channel.close()


async def test_api_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# pod keys\nalpha-key\n\nbeta-key\n")
    models = models_dir_with(tmp_path / "models", "demo-1")
    async with running(settings_for(models, api_keys_file=keys)) as (server, stub, health):
        request = pb.GenerateFrameRequest(model="demo", frame_id=1)
        await expect_status(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.GenerateFrame(request), "API key")
        await expect_status(grpc.StatusCode.UNAUTHENTICATED,
                            lambda: stub.GenerateFrame(request, metadata=(("x-api-key", "wrong"),)), "not valid")
        await expect_status(grpc.StatusCode.UNAUTHENTICATED,
                            lambda: stub.StreamFrames(pb.StreamFramesRequest(model="demo")))
        await expect_status(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.StreamAudio(live_requests("demo", b"")))
        await expect_status(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.ListModels(pb.ListModelsRequest()))
        ok = await stub.GenerateFrame(request, metadata=(("x-api-key", "alpha-key"),))
        assert ok.frame_id == 1
        bearer = await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer beta-key"),))
        assert [m.name for m in bearer.models] == ["demo"]
        # Probes and tooling need no key.
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
        assert server.data_plane.metrics.sample("lipsync_request_duration_seconds_count",
                                     {"method": "GenerateFrame", "code": "UNAUTHENTICATED"}) == 2


async def test_redis_cache_shared_by_pods_and_its_outage(tmp_path):
    redis_server = RedisServer(tmp_path).start()
    try:
        settings = settings_for(models_dir_with(tmp_path / "a", "demo-1"), redis_url=redis_server.url)
        other_settings = settings_for(models_dir_with(tmp_path / "b", "demo-1"), redis_url=redis_server.url)
        async with running(settings) as (server, stub, _), running(other_settings) as (_, other_stub, _):
            request = pb.GenerateFrameRequest(model="demo", frame_id=4)
            first = await stub.GenerateFrame(request)
            assert not first.cached
            from_redis = await other_stub.GenerateFrame(request)  # another pod: only Redis can have it
            assert from_redis.cached and from_redis.image == first.image

            server.data_plane.cache.redis_cooldown_s = 0.2  # how long Redis is left alone after a failure
            redis_server.stop()  # Redis dies mid-run: requests keep working, uncached
            during = await asyncio.gather(*(stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=i))
                                            for i in range(4, 8)))
            assert [f.frame_id for f in during] == [4, 5, 6, 7] and not any(f.cached for f in during)
            assert server.data_plane.metrics.sample("lipsync_cache_bypass_total") > 0
            assert server.data_plane.metrics.sample("lipsync_cache_requests_total", {"kind": "frame", "result": "error"}) > 0
            stats = await stub.GetStats(pb.GetStatsRequest())
            assert stats.cache.backend == "redis" and stats.cache.bypassed > 0

            redis_server.start()  # back, empty: once the cool-down is over, frames are cached in it again
            served = []

            async def cached_again() -> bool:
                served.append(await stub.GenerateFrame(request))
                return served[-1].cached

            await wait_until_async(cached_again, what="frames to be cached in Redis again")
            assert not served[0].cached  # Redis came back empty
    finally:
        redis_server.stop()


async def test_a_new_model_version_invalidates_cached_frames(tmp_path):
    redis_server = RedisServer(tmp_path).start()
    try:
        models = models_dir_with(tmp_path / "models", "demo-1")
        async with running(settings_for(models, redis_url=redis_server.url)) as (server, stub, _):
            request = pb.GenerateFrameRequest(model="demo", frame_id=2)
            await stub.GenerateFrame(request)
            assert (await stub.GenerateFrame(request)).cached
            shutil.copy(package("demo-2"), models / "demo-2.zip")
            loaded = await stub.LoadModel(pb.LoadModelRequest(name="demo", version="2"))
            assert loaded.model.version == "2"
            fresh = await stub.GenerateFrame(request)
            assert fresh.model_version == "2" and not fresh.cached
            import redis

            keys = redis.Redis(host=LOOPBACK, port=redis_server.port).keys("lipsync:frame:demo:*")
            assert keys and all(k.startswith(b"lipsync:frame:demo:2:") for k in keys)
    finally:
        redis_server.stop()


async def test_registry_failures_are_unavailable(tmp_path, registry_dir):
    broken = Path(shutil.copytree(registry_dir, tmp_path / "registry"))
    stored = broken / "other/1/other-1.zip"
    data = bytearray(stored.read_bytes())
    data[-50] ^= 0xFF
    stored.write_bytes(bytes(data))
    registry = StaticRegistry(broken)
    models = models_dir_with(tmp_path / "models", "demo-1")
    try:
        async with running(settings_for(models, registry_url=registry.url)) as (_, stub, _):
            await expect_status(grpc.StatusCode.UNAVAILABLE, lambda: stub.GenerateFrame(
                pb.GenerateFrameRequest(model="other", frame_id=0)), "sha256 mismatch")
            await expect_status(grpc.StatusCode.NOT_FOUND, lambda: stub.GenerateFrame(
                pb.GenerateFrameRequest(model="nobody", frame_id=0)), "not in the registry")
    finally:
        registry.close()
    unreachable = f"http://{LOOPBACK}:{free_port()}/"
    async with running(settings_for(models, registry_url=unreachable)) as (server, stub, _):
        server.data_plane.registry.backoff_s = 0.01  # the retries are the registry tests' subject; keep this one quick
        await expect_status(grpc.StatusCode.UNAVAILABLE, lambda: stub.GenerateFrame(
            pb.GenerateFrameRequest(model="other", frame_id=0)), "registry unreachable")
        await expect_status(grpc.StatusCode.UNAVAILABLE, lambda: stub.ListRegistry(pb.ListRegistryRequest()))
        assert (await stub.GenerateFrame(pb.GenerateFrameRequest(model="demo", frame_id=0))).model == "demo"


async def test_private_registry_with_token(tmp_path, registry_dir):
    registry = StaticRegistry(registry_dir, token="pod-token")
    models = models_dir_with(tmp_path / "models", "demo-1")
    try:
        async with running(settings_for(models, registry_url=registry.url)) as (server, stub, _):
            server.data_plane.registry.backoff_s = 0.01
            await expect_status(grpc.StatusCode.UNAVAILABLE, lambda: stub.GenerateFrame(
                pb.GenerateFrameRequest(model="other", frame_id=0)), "HTTP 401")
        async with running(settings_for(models, registry_url=registry.url, registry_token="pod-token")) as (_, stub, _):
            assert (await stub.GenerateFrame(pb.GenerateFrameRequest(model="other", frame_id=0))).model == "other"
    finally:
        registry.close()


async def test_tls_and_preload(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    models = models_dir_with(tmp_path / "models", "demo-1")
    server = await Pod(settings_for(models, tls_cert=cert, tls_key=key, preload=["demo"])).start()
    try:
        assert [m.name for m in server.data_plane.store.resident] == ["demo"]  # loaded before the first request
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"{LOOPBACK}:{server.port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest(service="demo"))).status == SERVING
            frame = await pb_grpc.LipSyncStub(channel).GenerateFrame(pb.GenerateFrameRequest(model="demo"))
            assert frame.width == 48
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        await server.stop(grace_s=1)


# ------------------------------------------------------------------------------------------ hostile and mistaken input


GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\x80" * 11]  # bad tag, length, varint


async def test_malformed_request_bytes_are_the_clients_error(pod, caplog):
    """Bytes that are not the method's message: INVALID_ARGUMENT, no traceback or ERROR in the pod's log,
    counted under the method, and the pod stays SERVING."""
    server, _, health = pod
    before = server.data_plane.metrics.sample("lipsync_request_duration_seconds_count",
                                   {"method": "GenerateFrame", "code": "INVALID_ARGUMENT"})
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{server.port}") as channel:
        calls = {"GenerateFrame": channel.unary_unary, "GenerateBatch": channel.unary_unary,
                 "StreamFrames": channel.unary_stream, "ListModels": channel.unary_unary,
                 "LoadModel": channel.unary_unary, "GetStats": channel.unary_unary}
        with caplog.at_level("INFO"):
            for method, kind in calls.items():
                for garbage in GARBAGE:
                    call = kind(f"/lipsync.v1.LipSync/{method}", request_serializer=None,
                                response_deserializer=None)
                    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda c=call, g=garbage: c(g),
                                        "not a valid lipsync.v1.")

            async def garbage_stream():
                yield GARBAGE[0]

            audio = channel.stream_stream("/lipsync.v1.LipSync/StreamAudio", request_serializer=None,
                                          response_deserializer=None)
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: audio(garbage_stream()), "StreamAudioRequest")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert server.data_plane.metrics.sample("lipsync_request_duration_seconds_count",
                                 {"method": "GenerateFrame", "code": "INVALID_ARGUMENT"}) == before + len(GARBAGE)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING


async def test_error_messages_echo_only_a_little_of_a_huge_value(pod):
    """A 100,000-character name is refused as INVALID_ARGUMENT with a short message, not echoed whole until
    gRPC's metadata limit turns it into RESOURCE_EXHAUSTED."""
    _, stub, health = pod
    name = "x" * 100_000
    calls = [lambda: stub.GenerateFrame(pb.GenerateFrameRequest(model=name, frame_id=0)),
             lambda: stub.LoadModel(pb.LoadModelRequest(name=name)),
             lambda: stub.LoadModel(pb.LoadModelRequest(name="demo", version=name)),
             lambda: stub.UnloadModel(pb.UnloadModelRequest(name=name)),
             lambda: stub.StreamFrames(pb.StreamFramesRequest(model=name)),
             lambda: stub.GenerateBatch(pb.GenerateBatchRequest(items=[pb.GenerateFrameRequest(model=name)])),
             lambda: stub.StreamAudio(live_requests(name, b""))]
    for call in calls:
        details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, call, "is not valid")
        assert "xxxx…" in details and len(details) < 300, details
    details = await expect_status(grpc.StatusCode.NOT_FOUND,
                                  lambda: health.Check(health_pb2.HealthCheckRequest(service=name)), "no model named")
    assert len(details) < 300


async def test_model_health_needs_a_key_with_health_requires_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("health-key\n")
    models = models_dir_with(tmp_path / "models", "demo-1")
    key = (("x-api-key", "health-key"),)
    async with running(settings_for(models, api_keys_file=keys, health_requires_key=True, preload=["demo"])) as (
            server, _, health):
        # The pod's own health stays open: kubelet probes carry no key.
        for service in ("", "lipsync.v1.LipSync"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING
        for service in ("demo", "nobody"):  # without a key, which models exist is not told
            await expect_status(grpc.StatusCode.UNAUTHENTICATED,
                                lambda s=service: health.Check(health_pb2.HealthCheckRequest(service=s)),
                                "--health-requires-key")
        assert (await health.Check(health_pb2.HealthCheckRequest(service="demo"), metadata=key)).status == SERVING
        await expect_status(grpc.StatusCode.NOT_FOUND, lambda: health.Check(
            health_pb2.HealthCheckRequest(service="nobody"), metadata=key), "no model named 'nobody'")
        watch = health.Watch(health_pb2.HealthCheckRequest(service="demo"))
        await expect_status(grpc.StatusCode.UNAUTHENTICATED, lambda: watch)
        assert server.data_plane.metrics.sample("lipsync_request_duration_seconds_count",
                                     {"method": "Health.Check", "code": "UNAUTHENTICATED"}) == 2
    # Without the setting a model's health is open, as documented in docs/API.md.
    async with running(settings_for(models, api_keys_file=keys, preload=["demo"])) as (_, _, health):
        assert (await health.Check(health_pb2.HealthCheckRequest(service="demo"))).status == SERVING


@pytest.mark.parametrize("flag", ["port", "metrics_port", "http_port"])
async def test_a_busy_port_is_one_clear_error_and_nothing_stays_bound(tmp_path, flag):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        ports = {"port": free_port(), "metrics_port": free_port(), "http_port": free_port(),
                 flag: taken.getsockname()[1]}
        pod = Pod(settings_for(tmp_path, **ports))
        with pytest.raises(Unavailable, match=f"cannot listen on {LOOPBACK}:{ports[flag]} .*--{flag.replace('_', '-')}"):
            await pod.start()
    for name, port in ports.items():  # whatever was bound before the failure was released
        if name != flag:
            with socket.socket() as probe:
                probe.bind((LOOPBACK, port))


async def test_serve_with_a_busy_metrics_port_prints_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "inference_pod.cli", "serve", "--host", LOOPBACK, "--port", "0", "--http-port", "0",
             "--metrics-port", str(taken.getsockname()[1]), "--models-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=240)  # a new process imports torch: minutes when busy
    errors = [line for line in result.stderr.splitlines() if line.startswith("lipsync: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "metrics port" in errors[0], result.stderr
