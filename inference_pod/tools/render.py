"""Offline rendering: an audio track through one character to PNG frames and, optionally, an mp4.

The device works on batch k+1 while a thread pool composites and writes batch k, so the GPU is not left
waiting on OpenCV and PNG compression.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from inference_pod.core import audio
from inference_pod.core.encoding import frame_pool
from inference_pod.core.engine import Engine
from inference_pod.errors import AudioError, InvalidInput, LipSyncError


@dataclass
class RenderResult:
    frames: int
    out_dir: Path
    video: Path | None


def track_for(engine: Engine, audio_path: Path | None, features_path: Path | None) -> np.ndarray:
    """The padded per-frame features to render: from precomputed features, an audio file, or the default track."""
    if features_path is not None:
        features = np.load(features_path, allow_pickle=False).astype(np.float32)
        return audio.pad_features(features.reshape(len(features), -1))
    if audio_path is not None:
        return engine.track_features(audio.load_audio(str(audio_path)))
    if engine.default_features is None:
        raise AudioError(f"model {engine.name!r} has no default audio track: pass --audio")
    return engine.default_features


def frame_name(index: int) -> str:
    return f"frame_{index:06d}.png"  # zero-padded so names sort in frame order


def render(
    engine: Engine,
    out_dir: Path,
    features: np.ndarray,
    video: Path | None = None,
    audio_path: Path | None = None,
    batch_size: int = 16,
    workers: int = 4,
    progress: bool = True,
) -> RenderResult:
    if batch_size < 1:
        raise InvalidInput(f"batch size must be >= 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(features)
    encoder = _VideoEncoder(video, audio_path, engine.fps) if video is not None else None

    def finish(frame_id: int, template: int, prediction: np.ndarray) -> np.ndarray:
        frame = engine.composite(template, prediction)
        if not cv2.imwrite(str(out_dir / frame_name(frame_id)), frame):  # PNG: lossless
            raise LipSyncError(f"cannot write {out_dir / frame_name(frame_id)}")
        return frame

    pending: deque = deque()
    tracker = RenderProgress(n, warmup_frames=min(batch_size, n))
    # tqdm's own rate counts the warm-up, so the postfix says rate and time left; tqdm writes it as ", TEXT"
    bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    with frame_pool(workers, "lipsync-render") as pool, tqdm(total=n, unit="frame", disable=not progress,
                                                               bar_format=bar_format, postfix="warming up") as bar:
        try:
            for start in range(0, n, batch_size):
                ids = list(range(start, min(start + batch_size, n)))
                templates = [engine.template_index(i) for i in ids]
                predictions = engine.predict(templates, engine.windows(features, ids))
                pending.extend(pool.submit(finish, i, t, p) for i, t, p in zip(ids, templates, predictions, strict=True))
                # Keep about two batches in flight: enough to overlap, bounded in memory.
                while len(pending) > 2 * batch_size:
                    _drain_one(pending, encoder, bar, tracker)
            while pending:
                _drain_one(pending, encoder, bar, tracker)
        except BaseException:
            if encoder is not None:
                encoder.abort()
            raise
    if encoder is not None:
        encoder.close()
    return RenderResult(frames=n, out_dir=out_dir, video=video)


def _drain_one(pending: deque, encoder, bar, tracker: RenderProgress) -> None:
    frame = pending.popleft().result()
    if encoder is not None:
        encoder.write(frame)
    tracker.update(1)
    bar.set_postfix_str(tracker.describe(), refresh=False)
    bar.update(1)


class RenderProgress:
    """Frames done, rate and time left for the progress bar, with the first batch left out of the rate.

    The first batch pays the model's warm-up (lazy initialisation, allocator growth, kernel selection);
    extrapolating it, as a plain rate-since-start does, predicted 17-27 minutes for a 35 s render. The rate
    here is the mean since the first batch completed, so bursts of frames finishing together even out.
    """

    def __init__(self, total: int, warmup_frames: int, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.done = 0
        self.warmup_frames = max(1, warmup_frames)
        self._clock = clock
        self._mark: tuple[float, int] | None = None  # (time, frames done) when the warm-up batch completed

    def update(self, frames: int = 1) -> None:
        self.done += frames
        if self._mark is None and self.done >= self.warmup_frames:
            self._mark = (self._clock(), self.done)

    def rate(self) -> float | None:
        """Frames per second since the warm-up batch, or None while there is nothing to measure yet."""
        if self._mark is None:
            return None
        seconds, frames = self._clock() - self._mark[0], self.done - self._mark[1]
        return frames / seconds if seconds > 0 and frames > 0 else None

    def seconds_left(self) -> float | None:
        rate = self.rate()
        return None if rate is None else (self.total - self.done) / rate

    def describe(self) -> str:
        rate, left = self.rate(), self.seconds_left()
        if rate is None:
            return "warming up" if self._mark is None else "measuring"
        return f"{rate:.1f} frame/s, {tqdm.format_interval(left)} left"


class _VideoEncoder:
    """Raw BGR frames piped into ffmpeg (H.264), with the audio track muxed in."""

    def __init__(self, path: Path, audio_path: Path | None, fps: int):
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise LipSyncError("--video needs ffmpeg on PATH (apt-get install ffmpeg)")
        self._path = path
        self._audio_path = audio_path
        self._fps = fps
        self._ffmpeg = ffmpeg
        self._proc: subprocess.Popen[bytes] | None = None

    def write(self, frame: np.ndarray) -> None:
        if self._proc is None:
            self._proc = self._start(frame.shape[1], frame.shape[0])
        assert self._proc.stdin is not None  # opened with stdin=PIPE
        self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())

    def _start(self, width: int, height: int) -> subprocess.Popen[bytes]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self._ffmpeg, "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "bgr24",
               "-s", f"{width}x{height}", "-r", str(self._fps), "-i", "pipe:0"]
        if self._audio_path is not None:
            cmd += ["-i", str(self._audio_path), "-c:a", "aac", "-shortest"]
        # yuv420p needs even sizes; pad by at most one pixel rather than fail.
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18",
                str(self._path)]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def close(self) -> None:
        if self._proc is None:
            return
        assert self._proc.stdin is not None and self._proc.stderr is not None  # both PIPE
        self._proc.stdin.close()
        stderr = self._proc.stderr.read().decode(errors="replace")
        if self._proc.wait() != 0:
            raise LipSyncError(f"ffmpeg failed: {stderr.strip()}")

    def abort(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
