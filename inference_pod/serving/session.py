"""Live avatar sessions: one character, one client, one frame per tick from start to end.

A session runs an output clock at the model's fps from the moment it starts. Tick k presents frame k at
k / fps seconds of the session's timeline together with the 1 / fps of audio that plays with it (640
samples of 16 kHz PCM16 at 25 fps; silence while idle), so a client muxes audio and video with no sync
logic of its own. The audio lives on one continuous timeline (``core.session_audio``): client audio is
placed at its end as it arrives; while nothing is queued the clock commits silence just far enough ahead
(the render-ahead, ``--session-render-ahead-ms``, plus the windows' 0.45 s look-ahead) that the frames about to be shown are fully
determined. Speech therefore plays ``lookahead_s`` after it arrives (plus at most a tick), and the
windows that span speech -> silence -> speech are computed from the real timeline, never cut.

Frame kinds: *speaking* (its window hears client audio: features and the network), *idle* (a silent
window: the same for every tick, so its image depends only on the template and is cached per model
version, template and output spec in ``IdleFrames``; after one pass through the templates idle costs no
network call) and *repeated* (the frame was not ready at its tick: the previous image again, with this
tick's audio, so video never drifts from audio). The template ping-pong index is the tick number.

``clear`` (barge-in) erases the client audio (played and queued) and every frame not yet emitted, so the
next tick is idle; it answers with the samples played and dropped. ``flush`` ends an utterance: no audio
changes (the silence that follows on the timeline completes its windows, as it would in speech), and a
``PlaybackFinished`` event follows the tick that played its last sample.

Everything is bounded per session: audio may be queued at most ``MAX_AHEAD_S`` ahead of playback (a
client sending faster waits: flow control; audio arriving slower than real time leaves gaps of silence,
as a live voice would), frames waiting for a slow reader are dropped past
``OUTBOX_FRAMES`` (counted; other sessions never wait for this reader), and events past ``OUTBOX_EVENTS``
end the session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference_pod.core import audio
from inference_pod.core.encoding import OutputSpec
from inference_pod.core.live_features import pcm_slices
from inference_pod.core.session_audio import (
    SAMPLES_PER_TICK,
    SessionTimeline,
    frame_support,
    silence_feature,
    tick_samples,
)
from inference_pod.errors import AudioError, Overloaded
from inference_pod.serving.catalog import check_model_name
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.model_store import LoadedModel
from inference_pod.serving.pipeline import LIVE_TRACK, FramePipeline, FrameResult, Timings

log = logging.getLogger(__name__)

SESSION_SAMPLE_RATE = audio.SAMPLE_RATE  # in and out: returned audio is the input, sample for sample
RENDER_AHEAD_S = 0.12  # frames are rendered this far ahead of their tick: time for the batcher and the encoder
MAX_AHEAD_S = 60.0  # audio queued ahead of playback before the client's sends wait
OUTBOX_FRAMES = 50  # frames (2 s at 25 fps) waiting for a slow reader before its frames are dropped
# An utterance starting from idle is placed this much further ahead (paced sessions), so chunks sent at
# real time that arrive a little late do not leave gaps of silence in it.
JITTER_S = 0.08
UNPACED_LEAD_FRAMES = 2  # unpaced: frames emitted ahead of the reader (its reading is the clock)
MAX_LATE_FRAMES = 2  # speaking frames that missed their tick, still finished (see Session._finish_late)
OUTBOX_EVENTS = 1000
IDLE_CACHE_BYTES = 256 << 20

# What both doors answer when a session's audio, clear or flush comes before its config.
CONFIG_FIRST = ("a session starts with its config (model, sample rate, channels; session_start on the "
                "WebSocket): audio, clear and flush come after it")
CONFIG_ONCE = "a session takes one config, at its start"
SPEAKING, IDLE, REPEATED = "speaking", "idle", "repeated"
FRAME_KINDS = ("speaking", "idle_cached", "idle_computed", "repeated")  # lipsync_session_frames_total{kind}


# ------------------------------------------------------------------------------------------ what goes in


@dataclass(frozen=True)
class SessionConfig:
    model: str
    output: OutputSpec
    sample_rate: int = SESSION_SAMPLE_RATE
    channels: int = 1
    paced: bool = True  # False: ticks as fast as frames are made and read (offline rendering, tests)

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.sample_rate != SESSION_SAMPLE_RATE or self.channels != 1:
            raise AudioError(f"a session's audio is 16 kHz mono PCM16 (what it returns too): got "
                             f"{self.sample_rate} Hz, {self.channels} channel(s)")


@dataclass(frozen=True)
class AudioChunk:
    pcm16: bytes


@dataclass(frozen=True)
class Clear:
    pass


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class End:
    pass


SessionInput = AudioChunk | Clear | Flush | End


# ------------------------------------------------------------------------------------------ what comes out


@dataclass(frozen=True)
class SessionFrame:
    tick: int
    pts: float  # seconds in the session's timeline: tick / fps
    kind: str  # speaking, idle or repeated
    result: FrameResult  # its frame_id is the tick; cached: an idle frame from the idle cache
    audio: bytes  # PCM16 16 kHz mono that plays with this frame


@dataclass(frozen=True)
class Started:
    session_id: str
    model: str
    version: str
    fps: int
    sample_rate: int
    samples_per_tick: int
    lookahead_s: float  # audio arriving now plays this much later (plus at most one tick)


@dataclass(frozen=True)
class Cleared:
    tick: int  # the last tick emitted before the clear (-1: none)
    pts: float
    played_samples: int  # of the audio cleared (every utterance not finished), samples that had played
    dropped_samples: int  # and samples that never will


@dataclass(frozen=True)
class PlaybackFinished:
    utterance: int  # 1, 2, ...: the audio between flushes (or clears)
    tick: int  # the tick that played its last sample
    pts: float
    samples: int


ENDED_BY_CLIENT = "ended"  # the client ended its input (half-close, session_end)
ENDED_DRAINING = "draining"  # the pod is shutting down: the client starts a new session on another pod


@dataclass(frozen=True)
class Ended:
    ticks: int
    frames: dict[str, int]  # by kind: speaking, idle_cached, idle_computed, repeated
    dropped: int  # frames a slow reader never got
    reason: str = ENDED_BY_CLIENT  # ENDED_BY_CLIENT or ENDED_DRAINING


SessionOutput = SessionFrame | Started | Cleared | PlaybackFinished | Ended


# ------------------------------------------------------------------------------------------ shared parts


class IdleFrames:
    """Idle frames of every model, by (model, version, template, output spec), LRU within a byte budget;
    and each model version's silence feature."""

    def __init__(self, budget_bytes: int = IDLE_CACHE_BYTES):
        self.budget_bytes = budget_bytes
        self._frames: collections.OrderedDict[tuple, FrameResult] = collections.OrderedDict()
        self._bytes = 0
        self._silence: dict[tuple[str, str], np.ndarray] = {}
        self._rendering: dict[tuple, asyncio.Task[FrameResult]] = {}

    def silence(self, model: LoadedModel) -> np.ndarray:
        key = (model.name, model.version)
        if key not in self._silence:
            self._silence[key] = silence_feature(model.engine)
        return self._silence[key]

    async def render(self, key: tuple, render: Coroutine[Any, Any, FrameResult]) -> tuple[FrameResult, bool]:
        """The idle frame ``key`` rendered by ``render``, once however many ticks or sessions want it at once
        (the second item: whether this call is the one that rendered it, i.e. made the network call). The render
        goes on, and fills the cache, when the caller stops waiting for it."""
        job = self._rendering.get(key)
        rendered_here = job is None
        if job is None:
            job = self._rendering[key] = asyncio.get_running_loop().create_task(render)
            job.add_done_callback(functools.partial(self._rendered, key))
        else:
            render.close()
        return await asyncio.shield(job), rendered_here

    def _rendered(self, key: tuple, job: asyncio.Task[FrameResult]) -> None:
        self._rendering.pop(key, None)
        if not job.cancelled() and job.exception() is None:
            self.put(key, dataclasses.replace(job.result(), timings=Timings()))

    def get(self, key: tuple) -> FrameResult | None:
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
        return frame

    def put(self, key: tuple, frame: FrameResult) -> None:
        if key in self._frames or len(frame.image) > self.budget_bytes:
            return
        self._frames[key] = frame
        self._bytes += len(frame.image)
        while self._bytes > self.budget_bytes:
            _, old = self._frames.popitem(last=False)
            self._bytes -= len(old.image)

    def forget(self, model: str) -> None:
        for key in [k for k in self._frames if k[0] == model]:
            self._bytes -= len(self._frames.pop(key).image)
        for key in [k for k in self._silence if k[0] == model]:
            del self._silence[key]

    def __len__(self) -> int:
        return len(self._frames)


class Admission:
    """At most ``limit`` sessions at once (0: no limit); the one beyond is refused at once."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit = limit
        self.active = 0
        self.metrics = metrics
        metrics.sessions_max.set(limit)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.limit and self.active >= self.limit:
            self.metrics.sessions_refused.inc()
            raise Overloaded(f"this pod already runs its maximum of {self.limit} live sessions (--max-sessions); "
                             "try another pod or retry later")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class _Outbox:
    """What the session has for its client: frames (dropped past OUTBOX_FRAMES when paced) and events."""

    def __init__(self) -> None:
        self._items: collections.deque[SessionOutput | BaseException] = collections.deque()
        self._frames = 0
        self._changed = asyncio.Event()

    def put(self, item: SessionOutput | BaseException) -> None:
        if isinstance(item, SessionFrame):
            self._frames += 1
        elif len(self._items) - self._frames >= OUTBOX_EVENTS:
            item = Overloaded("the session's client is not reading its events")
        self._items.append(item)
        self._changed.set()

    @property
    def frames(self) -> int:
        return self._frames

    async def wait_for_room(self, frames: int) -> None:
        while self._frames >= frames:
            self._changed.clear()
            await self._changed.wait()

    async def get(self) -> SessionOutput | BaseException:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        if isinstance(item, SessionFrame):
            self._frames -= 1
        self._changed.set()
        return item


# ------------------------------------------------------------------------------------------ the session


@dataclass
class _Utterance:
    number: int
    flushed: bool = False
    samples: int = 0
    end: int = 0  # timeline sample after its last one


@dataclass
class _Counts:
    frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FRAME_KINDS, 0))
    dropped: int = 0


class Session:
    """One running session. Build it with a resident model, then iterate ``run(inputs)``."""

    def __init__(self, model: LoadedModel, config: SessionConfig, pipeline: FramePipeline, metrics: Metrics,
                 idle_frames: IdleFrames, cpu_pool: Executor, render_ahead_s: float = RENDER_AHEAD_S) -> None:
        self.model = model
        self.engine = model.engine
        self.config = config
        self.pipeline = pipeline
        self.metrics = metrics
        self.idle_frames = idle_frames
        self.cpu_pool = cpu_pool
        self.fps = int(self.engine.fps)
        self.render_ahead = max(1, math.ceil(render_ahead_s * self.fps - 1e-9))  # ticks
        self._jitter_samples = round(JITTER_S * SESSION_SAMPLE_RATE) if config.paced else 0
        self.id = uuid.uuid4().hex[:16]
        self.timeline = SessionTimeline(self.engine, idle_frames.silence(model))
        self.emitted = -1  # the last tick emitted
        self._renders: dict[int, asyncio.Task[tuple[FrameResult, str]]] = {}
        self._late: set[asyncio.Task] = set()  # speaking frames that missed their tick, finishing for the repeats
        self._next_render = 0
        self._features_lock = asyncio.Lock()
        self._features_job: asyncio.Future[dict[int, np.ndarray]] | None = None  # the one in flight
        self._features_epoch = 0  # the epoch the job in flight was started in
        self._epoch = 0  # bumped by clear: work started before it is stale
        self._utterances: collections.deque[_Utterance] = collections.deque([_Utterance(1)])
        self._utterance_starts: collections.deque[tuple[int, float]] = collections.deque(maxlen=64)
        self._room = asyncio.Event()  # set when queued audio may grow again
        self._outbox = _Outbox()
        self._ending = False
        self._end_reason = ENDED_BY_CLIENT
        self._previous: FrameResult | None = None
        self.counts = _Counts()
        labels = {"model": model.name}
        self._frame_counters = {kind: metrics.session_frames.labels(kind=kind, **labels) for kind in FRAME_KINDS}
        self._dropped_counter = metrics.session_frames_dropped.labels(**labels)
        self._latency = metrics.session_speech_latency.labels(**labels)
        self._barge_ins = metrics.session_barge_ins.labels(**labels)
        self._commit_ahead(0)

    @property
    def lookahead_s(self) -> float:
        """From audio arriving (while nothing is queued) to the tick that plays it, at least."""
        return (self._ahead_end(0) + self._jitter_samples - tick_samples(0)[1]) / SESSION_SAMPLE_RATE

    def _ahead_end(self, tick: int) -> int:
        """Where the timeline must reach before ``tick``: the frames up to ``render_ahead`` later decided."""
        return frame_support(tick + self.render_ahead)[1]

    def _commit_ahead(self, tick: int) -> None:
        self.timeline.commit_silence(self._ahead_end(tick))
        self._schedule(tick + self.render_ahead)

    # -------------------------------------------------------------------------------------- running

    async def run(self, inputs: AsyncIterator[SessionInput]) -> AsyncIterator[SessionOutput]:
        loop = asyncio.get_running_loop()
        self.metrics.sessions_active.labels(model=self.model.name).inc()
        reader = loop.create_task(self._read(inputs), name=f"session-{self.id}-in")
        clock = loop.create_task(self._tick(), name=f"session-{self.id}-clock")
        try:
            yield Started(self.id, self.model.name, self.model.version, self.fps, SESSION_SAMPLE_RATE,
                          SAMPLES_PER_TICK, round(self.lookahead_s, 4))
            while True:
                item = await self._outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Ended):
                    return
        finally:
            self.metrics.sessions_active.labels(model=self.model.name).dec()
            tasks = [reader, clock, *self._renders.values(), *self._late]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def end(self, reason: str) -> None:
        """End the session from the pod's side (``reason``: ENDED_DRAINING): the clock stops at its next tick
        and the client gets Ended with the reason before its stream closes."""
        if not self._ending:
            self._end_reason = reason
            self._ending = True

    async def _read(self, inputs: AsyncIterator[SessionInput]) -> None:
        try:
            async for message in inputs:
                if self._ending:
                    break
                if isinstance(message, AudioChunk):
                    for piece in pcm_slices(message.pcm16):
                        await self.push(piece)
                elif isinstance(message, Clear):
                    self.clear()
                elif isinstance(message, Flush):
                    self.flush()
                elif isinstance(message, End):
                    break
            self._ending = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._outbox.put(exc)

    async def push(self, pcm16: bytes) -> None:
        """Client audio, placed at the end of the timeline; waits while MAX_AHEAD_S is already queued."""
        if len(pcm16) % 2:
            raise AudioError(f"session audio must be whole 16-bit samples: a message of {len(pcm16)} bytes is "
                             "odd")
        limit = int(MAX_AHEAD_S * SESSION_SAMPLE_RATE)
        while self.timeline.committed - tick_samples(self.emitted + 1)[0] + len(pcm16) // 2 > limit:
            self._room.clear()
            await self._room.wait()
        idle_before = self.timeline.queued_after(tick_samples(self.emitted + 1)[0]) == 0
        if idle_before and self.config.paced:
            self.timeline.commit_silence(self.timeline.committed + self._jitter_samples)
        utterance = self._utterances[-1]
        start, utterance.end = self.timeline.append(pcm16, utterance.number)
        utterance.samples += len(pcm16) // 2
        if idle_before and pcm16:
            self._utterance_starts.append((start, time.perf_counter()))

    def flush(self) -> None:
        current = self._utterances[-1]
        current.flushed = True
        self._utterances.append(_Utterance(current.number + 1))

    def clear(self) -> None:
        """Barge-in: every frame not emitted and all client audio go; the next tick is idle."""
        self._epoch += 1
        for task in self._renders.values():
            task.cancel()
        self._renders.clear()
        play_end = tick_samples(self.emitted + 1)[0]
        played, dropped = self.timeline.erase(play_end)
        unfinished = {u.number for u in self._utterances}
        self._utterances = collections.deque([_Utterance(self._utterances[-1].number + 1)])
        self._utterance_starts.clear()
        self._barge_ins.inc()
        pts = self.emitted / self.fps
        self._outbox.put(Cleared(self.emitted, pts, sum(v for u, v in played.items() if u in unfinished),
                                 sum(dropped.values())))
        self._next_render = self.emitted + 1
        self._commit_ahead(self.emitted + 1)
        self._room.set()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        tick = 0
        try:
            while not self._ending:
                self._commit_ahead(tick)
                if self.config.paced:
                    delay = started + tick / self.fps - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    await self._outbox.wait_for_room(UNPACED_LEAD_FRAMES)
                if self._ending:
                    break
                self._emit(tick, await self._frame_for(tick))
                tick += 1
            self._outbox.put(Ended(tick, dict(self.counts.frames), self.counts.dropped, self._end_reason))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._outbox.put(exc)

    async def _frame_for(self, tick: int) -> tuple[FrameResult, str]:
        while True:
            if tick not in self._renders:  # never scheduled (the clock commits ahead): render it now
                self._schedule(tick)
            task = self._renders[tick]
            if self.config.paced and self._previous is not None and not task.done():
                del self._renders[tick]
                self._finish_late(tick, task)
                return dataclasses.replace(self._previous, frame_id=tick, cached=False, timings=Timings()), REPEATED
            # Done, or worth the wait (unpaced; the very first frame, with nothing to repeat yet). A clear
            # while waiting replaces it (the frame after a clear is idle): wait for the new one then.
            await asyncio.wait({task})
            if self._renders.get(tick) is task:
                del self._renders[tick]
                return task.result()

    def _finish_late(self, tick: int, task: asyncio.Task[tuple[FrameResult, str]]) -> None:
        """A frame missed its tick. An idle one is cancelled (its shared render goes on and fills the cache).
        A speaking one, up to MAX_LATE_FRAMES at a time, is finished and becomes the image the next repeats
        show: an overloaded session shows fewer distinct frames instead of freezing. Its audio stays its tick's."""
        if self.timeline.is_silent(tick) or len(self._late) >= MAX_LATE_FRAMES:
            task.cancel()
            return
        epoch = self._epoch
        self._late.add(task)

        def done(finished: asyncio.Task[tuple[FrameResult, str]]) -> None:
            self._late.discard(finished)
            if finished.cancelled() or finished.exception() is not None or epoch != self._epoch:
                return
            result = finished.result()[0]
            if self._previous is None or result.frame_id > self._previous.frame_id:
                self._previous = result

        task.add_done_callback(done)

    def _emit(self, tick: int, rendered: tuple[FrameResult, str]) -> None:
        result, kind = rendered
        label = kind if kind != IDLE else ("idle_cached" if result.cached else "idle_computed")
        self.counts.frames[label] += 1
        self._frame_counters[label].inc()
        if kind != REPEATED:
            self._previous = result
        end = tick_samples(tick)[1]
        frame = SessionFrame(tick, tick / self.fps, kind, result, self.timeline.tick_pcm(tick))
        self.emitted = tick
        if self.config.paced and self._outbox.frames >= OUTBOX_FRAMES:
            self.counts.dropped += 1
            self._dropped_counter.inc()
        else:
            self._outbox.put(frame)
        now = time.perf_counter()
        while self._utterance_starts and self._utterance_starts[0][0] < end:
            _, arrived = self._utterance_starts.popleft()
            self._latency.observe(now - arrived)
        while self._utterances[0].flushed:
            if self._utterances[0].end > end:
                break
            finished = self._utterances.popleft()
            self.timeline.forget_utterance(finished.number)
            self._outbox.put(PlaybackFinished(finished.number, tick, tick / self.fps, finished.samples))
        self.timeline.trim(tick + 1)
        self._room.set()

    # -------------------------------------------------------------------------------------- rendering

    def _schedule(self, upto: int) -> None:
        """Start rendering every frame up to tick ``upto`` (their audio is committed)."""
        loop = asyncio.get_running_loop()
        while self._next_render <= upto:
            tick = self._next_render
            if self.timeline.is_silent(tick):
                coro = self._idle(tick)
            elif self.timeline.is_ready(tick):
                coro = self._speaking(tick, self._epoch)
            else:
                break
            self._renders[tick] = loop.create_task(coro, name=f"session-{self.id}-frame-{tick}")
            self._next_render += 1

    async def _idle(self, tick: int) -> tuple[FrameResult, str]:
        template = self.engine.template_index(tick)
        key = (self.model.name, self.model.version, template, self.config.output.key)
        cached = self.idle_frames.get(key)
        if cached is None:
            render = self.pipeline.render(self.model, tick, LIVE_TRACK, self.config.output,
                                          window=self.timeline.silence_window(), in_stream=True)
            computed, rendered_here = await self.idle_frames.render(key, render)
            # A tick that waited for another tick's render of the same template made no network call.
            return dataclasses.replace(computed, frame_id=tick, cached=not rendered_here), IDLE
        self.metrics.frames_generated.labels(model=self.model.name, source="cache").inc()
        return dataclasses.replace(cached, frame_id=tick, cached=True), IDLE

    async def _speaking(self, tick: int, epoch: int) -> tuple[FrameResult, str]:
        started = time.perf_counter()
        async with self._features_lock:  # one feature job per session at a time, in tick order
            while epoch == self._epoch:
                job = self._features_job
                if job is None:
                    job = self._start_features(tick, epoch)
                    if job is None:
                        break
                # Shielded: a frame that misses its tick is cancelled, but the features it asked for are
                # the next frames' too, so the job finishes and keeps its result (no work thrown away and
                # redone by the next tick, which would never catch up on a loaded pod).
                await asyncio.shield(job)
                # Awaiting a job that is already done returns without yielding, possibly before the job's
                # done callback has run (a loaded loop runs the job's completion and this task in one pass):
                # settle it here, or this loop spins forever and starves every session on the event loop.
                self._settle_features(job)
        if epoch != self._epoch:
            raise asyncio.CancelledError  # cleared while its features were computed
        features_s = time.perf_counter() - started
        result = await self.pipeline.render(self.model, tick, LIVE_TRACK, self.config.output,
                                            window=self.timeline.window(tick), in_stream=True)
        result.timings.features_s = features_s
        return result, SPEAKING

    def _start_features(self, tick: int, epoch: int) -> asyncio.Future[dict[int, np.ndarray]] | None:
        job = self.timeline.feature_job(tick)
        if job is None:
            return None
        future = asyncio.get_running_loop().run_in_executor(self.cpu_pool, job)
        self._features_job, self._features_epoch = future, epoch
        future.add_done_callback(self._settle_features)
        return future

    def _settle_features(self, job: asyncio.Future[dict[int, np.ndarray]]) -> None:
        """A finished feature job: no longer in flight, and its features in the timeline unless a clear made
        them stale. Once per job, by whichever comes first: its done callback or a waiter that found it done."""
        if job is not self._features_job:
            return  # settled already
        self._features_job = None
        if not job.cancelled() and job.exception() is None and self._features_epoch == self._epoch:
            self.timeline.add_features(job.result())


__all__ = ["ENDED_BY_CLIENT", "ENDED_DRAINING", "AudioChunk", "Admission", "Clear", "Cleared", "End", "Ended", "Flush", "IdleFrames",
           "PlaybackFinished", "Session", "SessionConfig", "SessionFrame", "SessionInput", "SessionOutput",
           "Started"]
