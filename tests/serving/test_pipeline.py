"""The shared frame path: audio inputs, one feature computation per audio, limits, frame ranges."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_support import models_dir_with, speech_pcm16, wav_bytes

from inference_pod.core.encoding import OutputSpec
from inference_pod.core.engine import Engine
from inference_pod.errors import AudioError, InvalidInput
from inference_pod.serving.batcher import Batcher
from inference_pod.serving.cache import Cache
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.model_store import ModelStore
from inference_pod.serving.pipeline import AudioInput, FramePipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingEngines:
    """Real engines whose feature extraction is counted."""

    def __init__(self):
        self.feature_calls = 0

    def __call__(self, package):
        engine = Engine.from_package(package, max_batch=4)
        compute = engine.track_features

        def counted(wav):
            self.feature_calls += 1
            return compute(wav)

        engine.track_features = counted
        return engine


@pytest.fixture
async def setup(tmp_path):
    models = models_dir_with(tmp_path / "models", "demo-1", "twin-1")
    metrics = Metrics()
    engines = CountingEngines()
    store = ModelStore(models_dir=models, extract_dir=models / ".store", metrics=metrics, engine_factory=engines,
                       batcher_factory=lambda name, engine: Batcher(name, engine, metrics, max_batch=4))
    pool = ThreadPoolExecutor(2)
    pipeline = FramePipeline(store, Cache(metrics), metrics, pool, max_audio_seconds=2.0)
    yield pipeline, engines, metrics
    await store.close()
    pool.shutdown()


def test_audio_input_checks_and_digests():
    pcm = b"\x01\x00" * 100
    assert AudioInput(pcm, "pcm16", 16000).digest != AudioInput(pcm, "pcm16", 8000).digest
    assert AudioInput(pcm, "pcm16", 16000).digest != AudioInput(pcm, "file").digest
    assert AudioInput(pcm, "pcm16", 16000).digest == AudioInput(bytes(pcm), "pcm16", 16000).digest
    assert AudioInput(pcm, "pcm16", 16000, 2).seconds_hint() == pytest.approx(100 / 32000)
    for bad in ({"data": b""}, {"data": pcm, "kind": "mp3"}, {"data": pcm, "kind": "pcm16", "sample_rate": 100},
                {"data": pcm, "kind": "pcm16", "sample_rate": 16000, "channels": 9}):
        with pytest.raises(InvalidInput):
            AudioInput(**bad)


async def test_one_feature_computation_per_audio_shared_by_models(setup):
    pipeline, engines, metrics = setup
    clip = AudioInput(wav_bytes(speech_pcm16(0.8, seed=4)), "file")
    results = await asyncio.gather(*(pipeline.frame(model, i, clip, OutputSpec())
                                     for model in ("demo", "twin") for i in range(3)))
    assert [r.frame_id for r in results] == [0, 1, 2, 0, 1, 2]
    assert engines.feature_calls == 1  # six requests, two models with one encoder: one computation
    hits = {"kind": "features", "result": "hit"}
    hits_before = metrics.sample("lipsync_cache_requests_total", hits)
    again = await pipeline.frame("demo", 5, clip, OutputSpec())
    assert engines.feature_calls == 1   # from the feature cache: one more hit, no computation
    assert metrics.sample("lipsync_cache_requests_total", hits) == hits_before + 1
    # Every request reports the time it spent getting its features (computed or cached), within its total.
    for result in (*results, again):
        assert 0 < result.timings.features_s <= result.timings.total_s, result.timings


async def test_audio_limits_and_frame_ranges(setup):
    pipeline, _, _ = setup
    long_pcm = AudioInput(speech_pcm16(2.5), "pcm16", 16000)
    with pytest.raises(AudioError, match="limit"):
        await pipeline.frame("demo", 0, long_pcm, OutputSpec())
    long_file = AudioInput(wav_bytes(speech_pcm16(2.5)), "file")  # length known only after decoding
    with pytest.raises(AudioError, match="limit"):
        await pipeline.frame("demo", 0, long_file, OutputSpec())
    with pytest.raises(InvalidInput, match="outside the track"):
        await pipeline.frame("demo", 10_000, None, OutputSpec())
    frames = [r.frame_id async for r in pipeline.stream("demo", 3, 5, None, OutputSpec(format="png"))]
    assert frames == [3, 4, 5]


async def test_full_frame_jpegs_are_spliced_after_each_templates_first_and_counted(tmp_path):
    from inference_pod.core.encoding import encode_image
    from inference_pod.tools.demo_character import build_demo_package

    models = tmp_path / "models"
    models.mkdir()
    build_demo_package("wide", models / "wide-1.zip", width=4, frames=3, seed=2, size=(320, 240), audio_seconds=1.0)
    metrics = Metrics()
    store = ModelStore(models_dir=models, extract_dir=models / ".store", metrics=metrics,
                       engine_factory=lambda package: Engine.from_package(package, max_batch=4),
                       batcher_factory=lambda name, engine: Batcher(name, engine, metrics, max_batch=4))
    pool = ThreadPoolExecutor(2)
    try:
        pipeline = FramePipeline(store, Cache(metrics), metrics, pool)
        results = [r async for r in pipeline.stream("wide", 0, 7, None, OutputSpec(jpeg_quality=75))]
        async with store.use("wide") as model:
            engine = model.engine
            windows = engine.windows(engine.default_features, list(range(8)))
            for r in results:  # what the plain path gives for the same prediction, byte for byte
                prediction = engine.predict([r.template_id], windows[r.frame_id : r.frame_id + 1])[0]
                assert r.image == encode_image(engine.composite(r.template_id, prediction), OutputSpec(jpeg_quality=75))
                assert (r.width, r.height) == (320, 240)
        plain = metrics.sample("lipsync_full_frame_jpegs_total", {"model": "wide", "path": "plain"})
        spliced = metrics.sample("lipsync_full_frame_jpegs_total", {"model": "wide", "path": "spliced"})
        assert plain + spliced == 8 and spliced >= 8 - 3  # 3 templates: at most one plain frame each
        await pipeline.frame("wide", 0, None, OutputSpec(region="prediction"))
        assert metrics.sample("lipsync_full_frame_jpegs_total", {"model": "wide", "path": "plain"}) == plain
    finally:
        await store.close()
        pool.shutdown()


async def test_streams_beyond_the_queue_limit_slow_down_instead_of_failing(tmp_path):
    """More concurrent streams than the model's queue holds: every stream gets all its frames, in order (a
    lone request at that moment is refused, to retry)."""
    models = models_dir_with(tmp_path / "models", "demo-1")
    metrics = Metrics()
    store = ModelStore(models_dir=models, extract_dir=models / ".store", metrics=metrics,
                       engine_factory=lambda package: Engine.from_package(package, max_batch=2),
                       batcher_factory=lambda name, engine: Batcher(name, engine, metrics, max_batch=2, max_queue=2))
    pool = ThreadPoolExecutor(2)
    try:
        pipeline = FramePipeline(store, Cache(metrics), metrics, pool)
        output = OutputSpec(region="prediction", format="raw")

        async def one_stream(first: int) -> list[int]:
            return [r.frame_id async for r in pipeline.stream("demo", first, first + 5, None, output)]

        streams = await asyncio.gather(*(one_stream(k) for k in range(8)), return_exceptions=True)
        assert streams == [list(range(k, k + 6)) for k in range(8)]
    finally:
        await store.close()
        pool.shutdown()
