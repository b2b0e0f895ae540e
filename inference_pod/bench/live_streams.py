"""Live audio: M concurrent ``StreamAudio`` calls fed at real time, every frame held against a deadline.

Each stream sends 16 kHz PCM16 in fixed chunks (40 ms by default) paced by the clock, as a microphone
would; the streams start staggered across one chunk period, as independent callers would. Frame i cannot
exist before the audio its window reads has arrived (raw AVE feature i+6, i.e. mel frames up to
window_start(i+6)+15, whose STFT reads samples up to 200 t + 400: see inference_pod/core/live_features.py), about
0.04 i + 0.45 s of audio. That look-ahead belongs to the model, not to the server, so the clock starts when
the chunk completing frame i's audio was sent (frames flushed at the end: the half-close, then one frame
period per flushed frame, as playback would show them). Deadline = that moment + the latency budget; a frame later than that, or never received, is
missed. M grows until a level misses most of its frames or M reaches the maximum.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import grpc
import numpy as np
from tqdm import tqdm

from inference_pod.bench.report import latency_summary
from inference_pod.bench.request_driver import connect
from inference_pod.core import audio
from inference_pod.tools.demo_character import speech_like_audio

STOP_MISS_SHARE = 0.5  # a level missing more than this ends the escalation: larger M only miss more
OVERRUN_S = 30.0  # a stream still open this long after its audio ended is cancelled


def audio_needed(frame_id: int) -> int:
    """16 kHz samples that must have arrived before the server can compute output frame ``frame_id``."""
    raw_feature = frame_id + audio.FEATURE_CONTEXT - 2  # frame i reads padded features up to i+7 = raw i+6
    last_mel = audio.window_start(raw_feature, 1 << 62) + audio.MEL_WINDOW - 1
    return last_mel * audio.HOP + audio.N_FFT // 2


def stream_levels(max_streams: int) -> list[int]:
    """1, 2, 3, 4, then about +50 % per step, up to and including ``max_streams``."""
    levels, m = [], 1
    while m < max_streams:
        levels.append(m)
        m = m + 1 if m < 4 else m + max(1, m // 2)
    return levels + [max_streams] if max_streams >= 1 else []


def speech_pcm16(seconds: float, seed: int) -> bytes:
    return (np.clip(speech_like_audio(seconds, seed), -1.0, 1.0) * 32767).astype("<i2").tobytes()


@dataclass
class StreamRecord:
    """One stream's timeline: what was sent when, what came back when."""

    pcm: bytes
    sent_samples: list[int] = field(default_factory=list)  # cumulative, after each chunk
    sent_at: list[float] = field(default_factory=list)
    ended_at: float | None = None  # half-close
    frames: list[tuple[int, float]] = field(default_factory=list)  # (frame id, received at)
    error: str | None = None

    @property
    def expected(self) -> int:
        return audio.frame_count(len(self.pcm) // 2)

    @cached_property
    def first_flushed(self) -> int:
        """The first frame whose audio was only complete at the half-close (read once the stream ended)."""
        total = self.sent_samples[-1] if self.sent_samples else 0
        return next(i for i in range(self.expected + 1) if audio_needed(i) > total)

    def clock_start(self, frame_id: int) -> float | None:
        """When frame ``frame_id`` could first have been computed: the send time of the chunk completing its
        audio. Flushed frames come all at once at the half-close, but playback shows them one frame period
        apart, so each starts its clock one period after the one before."""
        k = bisect.bisect_left(self.sent_samples, audio_needed(frame_id))
        if k < len(self.sent_at):
            return self.sent_at[k]
        if self.ended_at is None:
            return None
        return self.ended_at + (frame_id - self.first_flushed) / audio.VIDEO_FPS

    def in_order(self) -> bool:
        return [f for f, _ in self.frames] == list(range(len(self.frames)))


def _run_stream(target: str, model: str, record: StreamRecord, chunk_s: float, start: threading.Barrier,
                offset_s: float, started: list[float], api_key: str | None) -> None:
    chunk_bytes = 2 * int(round(audio.SAMPLE_RATE * chunk_s))
    with connect(target, api_key, OVERRUN_S) as client:
        start.wait()
        begin = started[0] + offset_s

        def chunks():
            total = 0
            for k, pos in enumerate(range(0, len(record.pcm), chunk_bytes)):
                wait = begin + k * chunk_s - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                chunk = record.pcm[pos : pos + chunk_bytes]
                total += len(chunk) // 2
                record.sent_samples.append(total)
                record.sent_at.append(time.perf_counter())
                yield chunk
            record.ended_at = time.perf_counter()

        call = client.stream_audio(model, chunks(), sample_rate=audio.SAMPLE_RATE)
        audio_s = len(record.pcm) / 2 / audio.SAMPLE_RATE
        watchdog = threading.Timer(offset_s + audio_s + OVERRUN_S, call.cancel)
        watchdog.start()
        try:
            for frame in call:
                if frame.model != model or not frame.image:
                    record.error = "WRONG_FRAME"
                record.frames.append((frame.frame_id, time.perf_counter()))
        except grpc.RpcError as exc:
            record.error = exc.code().name
        finally:
            watchdog.cancel()


def run_level(target: str, model: str, streams: int, *, seconds: float, chunk_ms: float, budget_ms: float,
              seed: int = 0, api_key: str | None = None) -> dict:
    """``streams`` concurrent live streams of ``seconds`` of audio each; one table row."""
    chunk_s = chunk_ms / 1000.0
    records = [StreamRecord(speech_pcm16(seconds, seed + 1000 + k)) for k in range(streams)]
    started: list[float] = []
    barrier = threading.Barrier(streams, action=lambda: started.append(time.perf_counter()))
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            _run_stream(target, model, records[k], chunk_s, barrier, k * chunk_s / streams, started, api_key)
        except BaseException as exc:  # a connection failure or a bug: raised once every stream stopped
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True, name=f"bench-stream-{k}")
               for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [f for f in failures if not isinstance(f, threading.BrokenBarrierError)]
    if real:
        raise real[0]

    budget_s = budget_ms / 1000.0
    latencies: list[float] = []
    missed, late_at_end, ok_frames, expected = 0, 0, 0, 0
    errors: dict[str, int] = {}
    last_received = started[0]
    for r in records:
        expected += r.expected
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
        # A stream's frames count when they are the frames asked for, in order; the rest of its frames
        # (never sent, or not rightly) are missed along with the late ones.
        good = r.frames if r.in_order() and r.error != "WRONG_FRAME" else []
        good = good[: r.expected]
        ok_frames += len(good)
        missed += r.expected - len(good)
        for frame_id, received in good:
            start = r.clock_start(frame_id)
            latency = received - start if start is not None else float("inf")
            latencies.append(latency)
            missed += latency > budget_s
            late_at_end += latency > budget_s and frame_id >= r.first_flushed
            last_received = max(last_received, received)
    wall = last_received - started[0]
    return {
        "scenario": "live",
        "label": f"{streams} live stream{'s' if streams > 1 else ''}",
        "streams": streams,
        "planned_frames": expected,
        "ok_frames": ok_frames,
        "fps": ok_frames / wall if wall > 0 else None,
        "wall_s": round(wall, 3),
        **latency_summary([x for x in latencies if np.isfinite(x)]),
        "success_rate": ok_frames / expected if expected else None,
        "missed": missed,
        "miss_share": missed / expected if expected else None,
        "missed_in_end_flush": late_at_end,  # of the late ones: frames computed at the half-close
        "errors": errors,
        "budget_ms": budget_ms,
        "audio_seconds": seconds,
    }


def live_streams(target: str, model: str, *, max_streams: int, seconds: float, chunk_ms: float = 40.0,
                 budget_ms: float = 200.0, seed: int = 0, api_key: str | None = None,
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Rows per level, and the summary: the largest M up to which no level missed a deadline."""
    rows: list[dict] = []
    levels = stream_levels(max_streams)
    bar = tqdm(levels, desc="live streams", unit="level", disable=not progress, leave=False)
    for m in bar:
        row = run_level(target, model, m, seconds=seconds, chunk_ms=chunk_ms, budget_ms=budget_ms, seed=seed,
                        api_key=api_key)
        rows.append(row)
        bar.set_postfix(streams=m, missed=f"{row['miss_share']:.0%}")
        if row["miss_share"] > STOP_MISS_SHARE:
            break
    bar.close()
    largest = 0
    for row in rows:  # levels in increasing order; the first level that misses ends the run of clean ones
        if row["missed"] or row["success_rate"] != 1.0:
            break
        largest = row["streams"]
    summary = {"largest_streams_without_miss": largest, "levels_tried": [r["streams"] for r in rows],
               "max_streams": max_streams, "budget_ms": budget_ms, "chunk_ms": chunk_ms, "audio_seconds": seconds,
               "stopped_early": len(rows) < len(levels)}
    return rows, summary
