"""The frame path every API shares: request -> model -> audio features -> batcher -> composite/encode -> cache.

Plain Python in and out (no protobuf), so the gRPC servicer and the HTTP gateway call the same code and
report the same errors. CPU work runs in the shared thread pool: audio decoding and feature extraction
from here, compositing and encoding as each frame's finish, which the batcher runs once the frame's device
batch is done (the device runs in each model's batcher thread).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from inference_pod.core import audio
from inference_pod.core.encoding import OutputSpec, encode_image
from inference_pod.core.live_features import LiveTrack, pcm_slices
from inference_pod.errors import AudioError, InvalidInput
from inference_pod.serving.cache import Cache, CachedFrame
from inference_pod.serving.catalog import check_model_name
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.model_store import LoadedModel, ModelStore
from inference_pod.serving.protocols import InferenceEngine

log = logging.getLogger(__name__)

DEFAULT_TRACK = "default"


@dataclass(frozen=True)
class AudioInput:
    """Request audio: a whole file (WAV, FLAC, OGG, MP3 ...) or raw 16-bit PCM at a declared rate."""

    data: bytes
    kind: str = "file"  # "file" or "pcm16"
    sample_rate: int = 0
    channels: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("file", "pcm16"):
            raise InvalidInput(f"audio kind must be 'file' or 'pcm16', got {self.kind!r}")
        if not self.data:
            raise AudioError("audio is empty")
        if self.kind == "pcm16":
            audio.check_format(self.sample_rate, self.channels, "PCM16 audio")

    @cached_property
    def digest(self) -> str:
        """Identifies the audio in cache keys: a hash of the bytes and of how to read them."""
        sha = hashlib.sha256(f"{self.kind}:{self.sample_rate}:{self.channels}:".encode())
        sha.update(self.data)
        return sha.hexdigest()[:40]

    def seconds_hint(self) -> float | None:
        if self.kind == "pcm16":
            return len(self.data) / (2 * self.channels * self.sample_rate)
        return None

    def decode(self, max_seconds: float | None = None) -> np.ndarray:
        """16 kHz mono samples; a file longer than ``max_seconds`` is refused before it is decoded whole."""
        if self.kind == "pcm16":
            return audio.pcm16_to_float(self.data, self.sample_rate, self.channels)
        return audio.decode_audio(self.data, max_seconds=max_seconds)


@dataclass(frozen=True)
class FrameRequest:
    """One frame asked for, as every front door reads it (GenerateFrame, a batch item, a /ws frame)."""

    model: str
    frame_id: int
    audio: AudioInput | None
    output: OutputSpec

    def __post_init__(self) -> None:  # what any request can be told without loading anything
        check_model_name(self.model)
        if self.frame_id < 0:
            raise InvalidInput(f"frame id {self.frame_id} is negative: frame ids count from 0")


@dataclass
class Track:
    """The padded features a request's frames index, and how they are named in the frame cache."""

    features: np.ndarray
    audio_id: str | None  # None: not cacheable (live audio)
    features_s: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.features)


LIVE_TRACK = Track(np.zeros((0, 0), np.float32), None)  # live frames carry their own windows


@dataclass
class Timings:
    total_s: float = 0.0
    features_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    encode_s: float = 0.0
    batch_size: int = 0


@dataclass
class FrameResult:
    model: str
    version: str
    frame_id: int
    template_id: int
    image: bytes
    output: OutputSpec
    width: int
    height: int
    crop_box: tuple[int, int, int, int, int]
    cached: bool
    timings: Timings = field(default_factory=Timings)  # total_s: the frame's processing time, on every door
    auto_loaded: bool = False  # its model was not resident when the request arrived (set by the data plane)


class FramePipeline:
    def __init__(self, store: ModelStore, cache: Cache, metrics: Metrics, cpu_pool: Executor, *,
                 max_audio_seconds: float = 600.0):
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.cpu_pool = cpu_pool
        self.max_audio_seconds = max_audio_seconds
        self._feature_jobs: dict[str, asyncio.Task[np.ndarray]] = {}

    # -------------------------------------------------------------------------------------- entry points

    async def frame(self, model_name: str, frame_id: int, audio_input: AudioInput | None,
                    output: OutputSpec) -> FrameResult:
        """One frame (GenerateFrame, and each GenerateBatch item)."""
        started = time.perf_counter()
        # Held for the whole request: an unload or eviction waits for it rather than pulling the engine away.
        async with self.store.use(model_name) as model:
            track = await self.track(model, audio_input)
            check_frame_id(frame_id, track)
            result = await self.render(model, frame_id, track, output)
        result.timings.features_s = track.features_s
        result.timings.total_s = time.perf_counter() - started
        return result

    async def stream(self, model_name: str, first: int, last: int | None, audio_input: AudioInput | None,
                     output: OutputSpec, realtime: bool = False, fps: float = 0.0) -> AsyncIterator[FrameResult]:
        """Frames first..last (inclusive; None: to the end of the track), in order (StreamFrames)."""
        if not 0 <= fps <= 1000:  # NaN too
            raise InvalidInput(f"fps must be 0..1000 (0: the model's), got {fps}")
        async with self.store.use(model_name) as model:
            track = await self.track(model, audio_input)
            last = track.frames - 1 if last is None else last
            check_frame_id(first, track)
            check_frame_id(last, track)
            if last < first:
                raise InvalidInput(f"last frame {last} is before first frame {first}")
            period = 1.0 / (fps or model.engine.fps) if realtime else 0.0

            async def frames() -> AsyncIterator[tuple[int, Track, np.ndarray | None]]:
                for frame_id in range(first, last + 1):
                    yield frame_id, track, None

            async for result in self._ordered(model, frames(), output, period):
                yield result

    async def live(self, model_name: str, sample_rate: int, channels: int, chunks: AsyncIterator[bytes],
                   output: OutputSpec) -> AsyncIterator[FrameResult]:
        """Live PCM16 chunks in, frames out as soon as each frame's audio window is complete (StreamAudio)."""
        async with self.store.use(model_name) as model:
            live = LiveTrack(model.engine, sample_rate, channels)
            loop = asyncio.get_running_loop()

            async def ready_frames() -> AsyncIterator[tuple[int, Track, np.ndarray | None]]:
                async for chunk in chunks:
                    for piece in pcm_slices(chunk):  # a huge message: short steps, each a point to stop at
                        for frame_id, window in await loop.run_in_executor(self.cpu_pool, live.push, piece):
                            yield frame_id, LIVE_TRACK, window
                for frame_id, window in await loop.run_in_executor(self.cpu_pool, live.finish):
                    yield frame_id, LIVE_TRACK, window

            async for result in self._ordered(model, ready_frames(), output, 0.0):
                yield result

    # -------------------------------------------------------------------------------------- features

    async def track(self, model: LoadedModel, audio_input: AudioInput | None) -> Track:
        engine = model.engine
        if audio_input is None:
            if engine.default_features is None:
                raise AudioError(f"model {model.name!r} has no default audio track: send audio")
            return Track(engine.default_features, DEFAULT_TRACK)
        hint = audio_input.seconds_hint()
        if hint is not None and hint > self.max_audio_seconds:
            raise audio.too_long(hint, self.max_audio_seconds)
        engine.require_audio_encoder()  # the one "no audio encoder" error
        encoder_id = model.encoder_id
        if encoder_id is None:  # an encoder the manifest does not list: features could not be cached by it
            raise RuntimeError(f"model {model.name!r} has an audio encoder its manifest does not list")
        started = time.perf_counter()
        if len(audio_input.data) > 1 << 20:  # hashing megabytes would stall every other request on the loop
            await asyncio.get_running_loop().run_in_executor(self.cpu_pool, lambda: audio_input.digest)
        key = self.cache.features_key(encoder_id, audio_input.digest)
        features = await self.cache.get_features(key)
        if features is None:
            # One computation per audio, however many requests bring it at once.
            job = self._feature_jobs.get(key)
            if job is None:
                job = asyncio.get_running_loop().create_task(self._compute_features(engine, audio_input, key))
                self._feature_jobs[key] = job
                job.add_done_callback(lambda _t: self._feature_jobs.pop(key, None))
            features = await asyncio.shield(job)
        return Track(features, audio_input.digest, time.perf_counter() - started)

    async def _compute_features(self, engine: InferenceEngine, audio_input: AudioInput, key: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        features = await loop.run_in_executor(self.cpu_pool, self._features_blocking, engine, audio_input)
        await self.cache.put_features(key, features)
        return features

    def _features_blocking(self, engine: InferenceEngine, audio_input: AudioInput) -> np.ndarray:
        wav = audio_input.decode(self.max_audio_seconds)
        if len(wav) > self.max_audio_seconds * audio.SAMPLE_RATE:
            raise audio.too_long(len(wav) / audio.SAMPLE_RATE, self.max_audio_seconds)
        return engine.track_features(wav)

    # -------------------------------------------------------------------------------------- frames

    async def render(self, model: LoadedModel, frame_id: int, track: Track, output: OutputSpec, *,
                     window: np.ndarray | None = None, in_stream: bool = False) -> FrameResult:
        """One frame of a track: from the frame cache, else through the batcher and the encoder. A frame of a
        stream waits for room in a full queue; a lone request is refused (RESOURCE_EXHAUSTED) to retry."""
        started = time.perf_counter()
        engine = model.engine
        key = None
        if track.audio_id is not None:
            key = self.cache.frame_key(model.name, model.version, track.audio_id, frame_id, _output_key(engine, output))
            cached = await self.cache.get_frame(key)
            if cached is not None:
                self.metrics.frames_generated.labels(model=model.name, source="cache").inc()
                return FrameResult(model.name, model.version, frame_id, cached.template_id, cached.image, output,
                                   cached.width, cached.height, cached.crop_box, True,
                                   Timings(total_s=time.perf_counter() - started))
        template_id = engine.template_index(frame_id)
        if window is None:
            window = engine.windows(track.features, [frame_id])[0]
        batch = await model.batcher.submit(template_id, window,
                                           functools.partial(_finish_image, engine, template_id, output=output),
                                           wait_for_space=in_stream)
        image, width, height, jpeg_path = batch.output
        if jpeg_path is not None:
            self.metrics.full_frame_jpegs.labels(model=model.name, path=jpeg_path).inc()
        box = engine.crop_box(template_id)
        crop_box = (box.x1, box.y1, box.x2, box.y2, box.size)
        if key is not None:
            await self.cache.put_frame(key, CachedFrame(image, width, height, template_id, crop_box))
        self.metrics.frames_generated.labels(model=model.name, source="model").inc()
        now = time.perf_counter()
        timings = Timings(total_s=now - started, queue_s=batch.queue_s, inference_s=batch.inference_s,
                          encode_s=batch.finish_s, batch_size=batch.batch_size)
        return FrameResult(model.name, model.version, frame_id, template_id, image, output, width, height,
                           crop_box, False, timings)

    async def _ordered(self, model: LoadedModel, items: AsyncIterator[tuple[int, Track, np.ndarray | None]],
                       output: OutputSpec, period: float) -> AsyncIterator[FrameResult]:
        """Render items with a bounded number in flight, so the batcher sees several frames of the stream at
        once; yield results in order, paced at ``period`` seconds per frame if it is not 0."""
        depth = max(1, min(model.batcher.max_batch, model.batcher.max_queue // 4))
        launched: asyncio.Queue = asyncio.Queue(maxsize=depth)
        loop = asyncio.get_running_loop()

        async def launch_all() -> None:
            try:
                async for frame_id, track, window in items:
                    task = loop.create_task(self.render(model, frame_id, track, output, window=window,
                                                        in_stream=True))
                    try:
                        await launched.put(task)
                    except asyncio.CancelledError:
                        task.cancel()
                        raise
            except Exception as exc:  # bad input mid-stream: delivered in order, after the frames before it
                await launched.put(exc)
            else:
                await launched.put(None)

        launcher = loop.create_task(launch_all(), name=f"stream-{model.name}")
        start = None  # pacing starts with the first frame, as playback would
        emitted = 0
        try:
            while True:
                item = await launched.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                result = await item
                if period:
                    start = loop.time() if start is None else start
                    delay = start + emitted * period - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                emitted += 1
                yield result
        finally:
            launcher.cancel()
            leftovers = [launcher]
            while not launched.empty():
                item = launched.get_nowait()
                if isinstance(item, asyncio.Task):
                    item.cancel()
                    leftovers.append(item)
            await asyncio.gather(*leftovers, return_exceptions=True)


def check_frame_id(frame_id: int, track: Track) -> None:
    if not 0 <= frame_id < track.frames:
        raise InvalidInput(f"frame id {frame_id} is outside the track: valid ids are 0..{track.frames - 1}")


def _output_key(engine: InferenceEngine, output: OutputSpec) -> str:
    """The frame cache's name for an output: a feathered full frame is another image than the exact one, and
    pods sharing a Redis may paste differently. Exact pastes keep the names they always had."""
    if output.region == "full" and engine.paste != "exact":
        return f"{output.key}.{engine.paste}"
    return output.key


def _finish_image(engine: InferenceEngine, template_id: int, prediction: np.ndarray, *,
                  output: OutputSpec) -> tuple[bytes, int, int, str | None]:
    """CPU pool: paste into the full frame if asked, then encode. Full-frame JPEGs are spliced where they
    can be (the same bytes, for the cost of the mouth region); the last item says how ("spliced", "plain")."""
    if output.region == "full" and output.format == "jpeg":
        jpeg = engine.full_frame_jpeg(template_id, prediction, output.jpeg_quality)
        return jpeg.data, jpeg.width, jpeg.height, jpeg.path
    image = engine.composite(template_id, prediction) if output.region == "full" else prediction
    height, width = image.shape[:2]
    return encode_image(image, output), width, height, None


__all__ = ["AudioInput", "FramePipeline", "FrameResult", "Timings", "Track", "check_frame_id"]
