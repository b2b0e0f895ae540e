"""The figures of one level of ``lipsync bench sessions`` (M sessions at once), from the sessions' records.

- **Frames by kind**, from each frame's ``kind`` and ``cached`` (``SessionEnded``'s counts when the transport
  cannot tell): speaking, idle from the idle cache (no network call: the calls saved), idle computed,
  repeated (not ready at its tick). Frames the pod dropped for a slow reader are the ticks never received.
- **Speech latency**: from sending the chunk that holds a reply's first voiced sample to receiving the
  frame that plays it (the first frame with voiced audio after it): the windows' look-ahead, the render-ahead,
  the jitter room, at most a tick, and the transport, as the client sees it.
- **Barge-in latency**: from sending ``clear`` to receiving the first frame after the ``cleared`` tick
  (which should be idle; its kind is counted).
- **A/V offset, timestamps**: each frame's audio position in the returned track (the samples of the ticks
  before it) against its ``pts``; 0 by construction on gRPC, where a frame carries its audio, and a real
  measure over transports that send audio and video apart.
- **A/V offset, pixels** (sessions of the trained demo only): the mouth's opening measured from the frames'
  pixels against the opening the returned audio gives, around each reply, as the quality gate does
  (``tools.lipsync_quality``): the cross-correlation's peak offset in frames (+: the mouth late) and r at 0.
"""

from __future__ import annotations

import numpy as np

from inference_pod.bench.report import latency_summary
from inference_pod.bench.session_driver import SessionRecord
from inference_pod.core import audio
from inference_pod.core.encoding import decode_image
from inference_pod.core.engine import CropBox
from inference_pod.tools.demo_character import mouth_track
from inference_pod.tools.lipsync_quality import mouth_opening_pixels, sync_score

KINDS = ("speaking", "idle_cached", "idle_computed", "repeated")
SYNC_MARGIN_TICKS = 10  # ticks either side of a reply's voiced audio in the pixel measure (as the session test)


def frame_counts(record: SessionRecord) -> dict[str, int]:
    counts = dict.fromkeys(KINDS, 0)
    if record.frames and all(f.kind is not None for f in record.frames):
        for f in record.frames:
            kind = f.kind or ""
            counts[kind if kind != "idle" else ("idle_cached" if f.cached else "idle_computed")] += 1
    elif record.ended is not None:  # the transport cannot tell kinds: the session's own count
        counts.update({k: record.ended.frames.get(k, 0) for k in KINDS})
    return counts


def ticks_before_media(record: SessionRecord) -> int:
    """Ticks before the first frame received: none over gRPC; over WebRTC the ticks while the connection was
    being set up (the tracks start at ``media_started``), not frames lost."""
    return record.frames[0].tick if record.frames else 0


def missing_ticks(record: SessionRecord) -> int:
    """Ticks never received from the first one on: the last tick + 1 (the session's ticks when it ended) less
    the ticks before the first frame and the frames seen."""
    ticks = record.ended.ticks if record.ended is not None else (record.frames[-1].tick + 1 if record.frames else 0)
    return ticks - ticks_before_media(record) - len(record.frames)


def speech_latencies(record: SessionRecord) -> list[float]:
    out = []
    arrived = np.array([f.arrived for f in record.frames])
    voiced = np.array([f.voiced for f in record.frames], dtype=bool)
    for reply in record.replies:
        if reply.voiced_sent_at is None:
            continue
        later = np.flatnonzero(voiced & (arrived >= reply.voiced_sent_at))
        if len(later):
            out.append(float(arrived[later[0]] - reply.voiced_sent_at))
    return out


def barge_ins(record: SessionRecord) -> tuple[list[float], dict[str, int], int]:
    """(latencies, the kinds of the first frame after each cleared tick, frames with speech received after
    the clear was sent)."""
    latencies: list[float] = []
    next_kinds: dict[str, int] = {}
    speech_after = 0
    for reply in record.replies:
        if reply.clear_sent_at is None or reply.cleared is None:
            continue
        after = [f for f in record.frames if f.tick > reply.cleared.tick]
        if after:
            latencies.append(after[0].arrived - reply.clear_sent_at)
            kind = after[0].kind or "unknown"
            next_kinds[kind] = next_kinds.get(kind, 0) + 1
        speech_after += sum(f.voiced and f.arrived > reply.clear_sent_at and f.tick <= reply.cleared.tick
                            for f in record.frames)
    return latencies, next_kinds, speech_after


def pod_counts(records: list[SessionRecord]) -> dict[str, int]:
    """The sessions' own counts (``SessionEnded``): frames emitted by kind, dropped ones included."""
    counts = dict.fromkeys((*KINDS, "dropped", "ticks"), 0)
    for r in records:
        if r.ended is not None:
            for k in KINDS:
                counts[k] += r.ended.frames.get(k, 0)
            counts["dropped"] += r.ended.dropped
            counts["ticks"] += r.ended.ticks
    return counts


def timestamp_offset_ms(record: SessionRecord) -> float | None:
    """Largest |audio position - pts| over the session's frames, in ms; a tick never received counts its
    samples_per_tick (the pod dropped it whole)."""
    if record.started is None or not record.frames:
        return None
    per_tick = record.started.samples_per_tick
    position, worst, previous = 0, 0.0, -1
    for f in record.frames:
        position += (f.tick - previous - 1) * per_tick
        worst = max(worst, abs(position / audio.SAMPLE_RATE - f.pts))
        position += f.audio_samples
        previous = f.tick
    return 1000.0 * worst


def mouth_series(record: SessionRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """(measured opening, true opening) over the ticks around the session's replies; None without images."""
    frames = [f for f in record.frames if f.image]
    if not frames or len(frames) != len(record.frames) or frames[-1].tick + 1 != len(frames):
        return None  # images not kept, or ticks missing: the series would not line up
    measured = np.empty(len(frames))
    for i, f in enumerate(frames):
        image = decode_image(f.image, f.image_format, *f.size)
        assert f.crop_box is not None  # a frame with an image has its crop box
        measured[i] = mouth_opening_pixels(image, CropBox(*f.crop_box))
    track = np.frombuffer(b"".join(f.audio for f in frames), "<i2").astype(np.float32) / 32768.0
    truth = mouth_track(track, len(frames))[:, 0]
    voiced = np.array([f.voiced for f in frames])
    near = np.convolve(voiced, np.ones(2 * SYNC_MARGIN_TICKS + 1), mode="same") > 0
    if not voiced.any():
        return None
    return measured[near], truth[near]


def pixel_sync(records: list[SessionRecord]) -> dict | None:
    """The quality gate's measure over every measured session's replies, concatenated."""
    pairs = [s for s in (mouth_series(r) for r in records if r.keep_images) if s is not None]
    if not pairs:
        return None
    measured = np.concatenate([m for m, _ in pairs])
    truth = np.concatenate([t for _, t in pairs])
    r0, peak, correlations = sync_score(measured, truth)
    fps = next(r.started.fps for r in records if r.started is not None)
    return {"sessions": len(pairs), "frames": int(len(measured)), "r_at_0": round(r0, 3), "peak_offset_frames": peak,
            "peak_offset_ms": round(1000.0 * peak / fps, 1), "r_at_peak": round(correlations[peak], 3)}


def level_row(sessions: int, records: list[SessionRecord], wall_s: float, pod_cpu_s: float | None,
              client_cpu_s: float | None = None) -> dict:
    """``pod_cpu_s``: the pod process's CPU over the level (None when it is not ours to read);
    ``client_cpu_s``: this process's (the transport's receiving and decoding, and the driver)."""
    ran = [r for r in records if r.started is not None and not r.refused]
    counts = dict.fromkeys(KINDS, 0)
    for r in ran:
        for k, v in frame_counts(r).items():
            counts[k] += v
    received = sum(len(r.frames) for r in ran)
    missing = sum(missing_ticks(r) for r in ran)
    before_media = sum(ticks_before_media(r) for r in ran)
    speech = [x for r in ran for x in speech_latencies(r)]
    barge = [barge_ins(r) for r in ran]
    barge_latency = [x for lat, _, _ in barge for x in lat]
    next_kinds: dict[str, int] = {}
    for _, kinds, _ in barge:
        for k, v in kinds.items():
            next_kinds[k] = next_kinds.get(k, 0) + v
    offsets = [o for o in (timestamp_offset_ms(r) for r in ran) if o is not None]
    computed = counts["speaking"] + counts["idle_computed"]
    shown = sum(counts.values())
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "sessions": sessions,
        "sessions_ran": len(ran),
        "refused": sum(r.refused for r in records),
        "errors": errors,
        "ticks": before_media + received + missing,
        "ticks_before_media": before_media,
        "frames_received": received,
        "dropped": missing,
        **counts,
        "repeated_share": counts["repeated"] / shown if shown else None,
        "speaking_share": counts["speaking"] / shown if shown else None,
        "network_frames": computed,  # frames the network computed (each a U-Net item; batched with others)
        "network_calls_saved": counts["idle_cached"],
        "saved_share": counts["idle_cached"] / shown if shown else None,
        "pod_counts": pod_counts(ran),
        "replies": sum(len(r.replies) for r in ran),
        "replies_cut": sum(r.clear_sent_at is not None for s in ran for r in s.replies),
        "replies_finished": sum(r.finished_at is not None for s in ran for r in s.replies),
        "speech_latency": latency_summary(speech) | {"count": len(speech)},
        "barge_ins": len(barge_latency),
        "barge_in_latency": latency_summary(barge_latency) | {"count": len(barge_latency)},
        "barge_in_next_kinds": next_kinds,  # the first frame after each cleared tick: idle, if all went well
        "speech_frames_after_clear": sum(s for _, _, s in barge),
        "av_timestamp_offset_ms": round(max(offsets), 3) if offsets else None,
        "av_pixel_sync": pixel_sync(ran),
        "wall_s": round(wall_s, 2),
        "frames_per_s": round(received / wall_s, 2) if wall_s > 0 else None,
        "pod_cpu_s": None if pod_cpu_s is None else round(pod_cpu_s, 2),
        "client_cpu_s": None if client_cpu_s is None else round(client_cpu_s, 2),
        # Cores busy per session over the level: CPU seconds / wall seconds / sessions.
        "pod_cpu_per_session": _per_session(pod_cpu_s, wall_s, sessions),
        "client_cpu_per_session": _per_session(client_cpu_s, wall_s, sessions),
    }


def _per_session(cpu_s: float | None, wall_s: float, sessions: int) -> float | None:
    if cpu_s is None or wall_s <= 0 or sessions <= 0:
        return None
    return round(cpu_s / wall_s / sessions, 4)
