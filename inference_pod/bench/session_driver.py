"""One benchmark session: a conversation's pattern played into a live session at real time, and a record of
everything that came back and when.

The pattern, as a voice agent's avatar sees it: the user speaks (the avatar idles, listening) for a random
gap, then the agent's reply plays: its speech sent in chunks at real time, as text-to-speech streams it.
A reply either ends (``flush``; the next gap starts when ``playback_finished`` says it has played) or is
interrupted (``clear`` a random part of the way in: a barge-in; the next gap starts at ``cleared``). Until
the session's time is up; then it ends. Barge-ins are spread evenly, ``barge_in_share`` of the replies
(every second reply at 0.5), each session at its own phase so that they do not all interrupt at once;
every other choice comes from the session's seeded generator.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from inference_pod.bench.session_transport import (
    Cleared,
    Ended,
    Frame,
    PlaybackFinished,
    SessionConnection,
    SessionFailed,
    SessionRefused,
    Started,
)
from inference_pod.core import audio

EVENT_TIMEOUT_S = 60.0  # an awaited event (started, cleared, playback_finished, ended) later than this fails


@dataclass(frozen=True)
class Pattern:
    """What every session of a run does."""

    duration_s: float  # replies start until this long after the session started; then it ends
    gap_s: tuple[float, float] = (0.6, 2.0)  # idle between replies (uniform)
    barge_in_share: float = 0.3  # replies interrupted by a clear, spread evenly
    cut_at: tuple[float, float] = (0.3, 0.8)  # how far into an interrupted reply the clear comes (uniform)
    chunk_ms: float = 40.0  # reply audio chunk, sent at real time


@dataclass
class FrameSeen:
    tick: int
    pts: float
    arrived: float
    kind: str | None
    cached: bool
    audio_samples: int
    voiced: bool  # any non-zero sample in its audio
    image: bytes = b""  # kept for the sessions whose mouths are measured
    image_format: str = "jpeg"
    size: tuple[int, int] = (0, 0)
    crop_box: tuple[int, int, int, int, int] | None = None
    audio: bytes = b""  # kept with the images


@dataclass
class Reply:
    samples: int
    voiced_sent_at: float | None = None  # when the chunk holding its first non-zero sample was sent
    clear_sent_at: float | None = None  # a barge-in: when the clear was sent
    cleared: Cleared | None = None
    cleared_at: float | None = None
    finished_at: float | None = None  # playback_finished arrived


@dataclass
class SessionRecord:
    model: str
    keep_images: bool = False
    started: Started | None = None
    started_at: float | None = None
    frames: list[FrameSeen] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    ended: Ended | None = None
    refused: bool = False
    error: str | None = None
    opened_at: float | None = None
    closed_at: float | None = None


class _Reader:
    """Reads a session's events into its record; the sender waits on what it needs."""

    def __init__(self, connection: SessionConnection, record: SessionRecord):
        self.connection = connection
        self.record = record
        self.started = asyncio.Event()
        self.changed = asyncio.Event()
        self.finished_utterances = 0

    async def run(self) -> None:
        record = self.record
        try:
            async for event in self.connection.events():
                now = time.perf_counter()
                if isinstance(event, Frame):
                    record.frames.append(self._seen(event, now))
                elif isinstance(event, Started):
                    record.started, record.started_at = event, now
                    self.started.set()
                elif isinstance(event, Cleared):
                    reply = next((r for r in reversed(record.replies) if r.clear_sent_at is not None), None)
                    if reply is not None and reply.cleared is None:
                        reply.cleared, reply.cleared_at = event, now
                elif isinstance(event, PlaybackFinished):
                    self.finished_utterances += 1
                    flushed = [r for r in record.replies if r.clear_sent_at is None and r.finished_at is None]
                    if flushed:
                        flushed[0].finished_at = now
                elif isinstance(event, Ended):
                    record.ended = event
                self.changed.set()
        except SessionRefused:
            record.refused = True
        except SessionFailed as exc:
            record.error = record.error or str(exc)
        finally:
            self.started.set()
            self.changed.set()

    def _seen(self, frame: Frame, now: float) -> FrameSeen:
        pcm = np.frombuffer(frame.audio, "<i2")
        seen = FrameSeen(frame.tick, frame.pts, now, frame.kind, frame.cached, len(pcm), bool(pcm.any()))
        if self.record.keep_images:
            seen.image, seen.image_format, seen.size = frame.image, frame.image_format, frame.size
            seen.crop_box, seen.audio = frame.crop_box, frame.audio
        return seen

    async def until(self, condition, timeout_s: float = EVENT_TIMEOUT_S) -> bool:
        """Until ``condition()`` holds or the events stop; False at the deadline."""
        deadline = time.perf_counter() + timeout_s
        while not condition():
            if self.record.ended is not None or self.record.refused or self.record.error:
                return condition()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                return condition()
        return True


def reply_pcm(clips: list[np.ndarray], rng: np.random.Generator) -> bytes:
    return clips[int(rng.integers(len(clips)))].tobytes()


def is_cut(reply: int, share: float, phase: float) -> bool:
    """Whether reply ``reply`` (0, 1, ...) is interrupted: ``share`` of the replies, evenly, from ``phase``."""
    return int(phase + (reply + 1) * share) > int(phase + reply * share)


async def play_session(connection: SessionConnection, record: SessionRecord, pattern: Pattern,
                       clips: list[np.ndarray], rng: np.random.Generator, phase: float = 0.0) -> SessionRecord:
    """Run one session to its end; failures are written into ``record`` (refused, error), never raised.
    ``phase`` (0..1) places its barge-ins among its replies."""
    reader = _Reader(connection, record)
    record.opened_at = time.perf_counter()
    reading = asyncio.get_running_loop().create_task(reader.run())
    try:
        await asyncio.wait_for(reader.started.wait(), EVENT_TIMEOUT_S)
        if record.started is not None:
            await _converse(connection, reader, pattern, clips, rng, phase)
            await connection.end()
            if not await reader.until(lambda: record.ended is not None):
                record.error = record.error or "no SessionEnded after the end of the session"
        await asyncio.wait_for(reading, EVENT_TIMEOUT_S)
    except TimeoutError:
        record.error = record.error or "timed out waiting for the session"
    finally:
        connection.cancel()
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        record.closed_at = time.perf_counter()
    return record


async def _converse(connection: SessionConnection, reader: _Reader, pattern: Pattern, clips: list[np.ndarray],
                    rng: np.random.Generator, phase: float) -> None:
    record = reader.record
    assert record.started_at is not None
    end = record.started_at + pattern.duration_s
    chunk = 2 * int(round(audio.SAMPLE_RATE * pattern.chunk_ms / 1000))
    chunk_s = pattern.chunk_ms / 1000
    while not (record.error or record.ended):
        await asyncio.sleep(rng.uniform(*pattern.gap_s))
        if time.perf_counter() >= end:
            return
        pcm = reply_pcm(clips, rng)
        barge_in = is_cut(len(record.replies), pattern.barge_in_share, phase)
        cut = rng.uniform(*pattern.cut_at) * len(pcm) if barge_in else len(pcm)
        reply = Reply(samples=len(pcm) // 2)
        record.replies.append(reply)
        first_voiced = 2 * int(np.flatnonzero(np.frombuffer(pcm, "<i2"))[0])
        began = time.perf_counter()
        for k, pos in enumerate(range(0, int(cut), chunk)):
            wait = began + k * chunk_s - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await connection.send_audio(pcm[pos : pos + chunk])
            if reply.voiced_sent_at is None and pos + chunk > first_voiced:
                reply.voiced_sent_at = time.perf_counter()
        if barge_in:
            reply.clear_sent_at = time.perf_counter()
            await connection.clear()
            ok = await reader.until(lambda r=reply: r.cleared is not None)
            what = "cleared"
        else:
            await connection.flush()
            ok = await reader.until(lambda r=reply: r.finished_at is not None,
                                    EVENT_TIMEOUT_S + len(pcm) / 2 / audio.SAMPLE_RATE)
            what = "playback_finished"
        if not ok:
            record.error = record.error or f"no {what} for reply {len(record.replies)}"
            return
