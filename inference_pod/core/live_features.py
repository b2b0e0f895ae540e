"""Live audio to frame windows: which output frames are ready as PCM arrives, and their audio windows.

SyncTalk_2D computes a whole track at once: mel spectrogram, one 16-mel-frame window per video frame
(window j starts at mel frame int(3.2 j)), the AVE encoder per window, then the first and last feature
repeated. Output frame i reads padded features i-8 .. i+7, i.e. raw features up to i+6.

Here the same numbers are produced incrementally. Mel frame t is centred on sample 200 t and reads samples
200 t - 400 .. 200 t + 400, so it is final once those samples exist; raw feature j is final once its 16 mel
frames are; frame i is ready once raw feature i+6 is. Each push recomputes the mel spectrogram only over a
short slice of recent audio, starting 3 mel frames before the first window still needed (so the slice's
zero padding and its first pre-emphasis sample never reach a window used; "needed" includes the last 16
mel frames, where windows past the end shift if the stream ends now), and encodes only the newly
completed windows. At end of stream the remaining windows are computed with SyncTalk_2D's end handling
(windows past the end shifted back, last feature repeated) and the rest of the frames flushed.

Work per step is bounded by the caller, not by the sender: a message of any size is pushed in slices of
``SLICE_BYTES`` (``pcm_slices``), so one huge message neither holds a CPU thread for minutes nor keeps
running after its client has gone.

Latency: frame i needs audio up to 0.04 i + 0.45 s, so a frame leaves about 0.45 s of audio (the window
look-ahead of 7 frames plus the mel window) after its own time, plus compute. Memory stays bounded: audio
and features older than the windows still needed are dropped, so a stream can run indefinitely.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from inference_pod.core import audio
from inference_pod.errors import AudioError

SLICE_BYTES = 16 << 10  # PCM pushed per step: 0.5 s of 16 kHz mono, a few tens of ms of CPU
MEL_MARGIN = 3  # mel frames of a slice that its zero padding / first pre-emphasis sample can reach
CONTEXT = audio.FEATURE_CONTEXT  # 8: padded features i-8 .. i+7 feed frame i


def pcm_slices(data: bytes, size: int = SLICE_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes (a piece may split a sample: LiveTrack carries it over)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


class FeatureEncoder(Protocol):
    """What a live track needs of an engine: its audio encoder, and the windows a frame reads."""

    def require_audio_encoder(self) -> None: ...
    def encode_windows(self, windows: np.ndarray) -> np.ndarray: ...
    def windows(self, features: np.ndarray, frame_ids: Sequence[int]) -> np.ndarray: ...


class LiveTrack:
    """Incremental features for one live stream. Not thread-safe: push/finish one at a time."""

    def __init__(self, engine: FeatureEncoder, sample_rate: int, channels: int = 1):
        audio.check_format(sample_rate, channels, "PCM16 audio")
        engine.require_audio_encoder()
        self.engine = engine
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = None
        if sample_rate != audio.SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, audio.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self._carry = b""  # bytes of an incomplete sample frame, kept for the next chunk
        self._samples = np.zeros(0, dtype=np.float32)  # 16 kHz mono, from absolute sample _sample_base
        self._sample_base = 0
        self._raw_count = 0  # raw features final so far
        self._last_raw: np.ndarray | None = None  # the latest, repeated at the end of the track
        self._padded: np.ndarray | None = None  # padded features P from absolute index _padded_base
        self._padded_base = 0
        self.next_frame = 0
        self.finished = False

    @property
    def samples_received(self) -> int:
        return self._sample_base + len(self._samples)

    @property
    def buffered_seconds(self) -> float:
        """Audio still held (it feeds windows not yet complete)."""
        return len(self._samples) / audio.SAMPLE_RATE

    @property
    def buffered_features(self) -> int:
        return 0 if self._padded is None else len(self._padded)

    # -------------------------------------------------------------------------------------- input

    def push(self, pcm: bytes) -> list[tuple[int, np.ndarray]]:
        """Add PCM16 bytes; returns (frame id, audio window) for every frame that became ready, in order."""
        if self.finished:
            raise AudioError("the audio stream has already ended")
        self._append(self._decode(pcm, last=False))
        n = self.samples_received
        # Raw feature j is final when its last mel frame's support (200 t + 400) lies inside the audio.
        final = self._raw_count
        while (audio.window_start(final, 1 << 62) + audio.MEL_WINDOW - 1) * audio.HOP + audio.N_FFT // 2 <= n:
            final += 1
        if final > self._raw_count:
            self._add_raw(self._encode_range(self._raw_count, final, total_mel=None))
        return self._ready(self._raw_count - (CONTEXT - 1))

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """End of stream: compute the last windows as SyncTalk_2D does and return every remaining frame."""
        if self.finished:
            return []
        tail = self._decode(b"", last=True)
        if self._carry:
            raise AudioError(f"the audio stream ended inside a sample frame ({len(self._carry)} stray bytes)")
        self._append(tail)
        self.finished = True
        n = self.samples_received
        audio.check_length(n)
        total_mel = 1 + n // audio.HOP
        count = audio.window_count(total_mel)
        if count > self._raw_count:
            self._add_raw(self._encode_range(self._raw_count, count, total_mel=total_mel))
        assert self._last_raw is not None  # count >= 1 raw windows exist once window_count passed
        self._extend_padded(self._last_raw[None])  # SyncTalk_2D repeats the last feature
        return self._ready(count + 2 - 1)

    # -------------------------------------------------------------------------------------- internals

    def _decode(self, pcm: bytes, last: bool) -> np.ndarray:
        data = self._carry + pcm
        frame_bytes = 2 * self.channels
        whole = len(data) - len(data) % frame_bytes
        self._carry = data[whole:]
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
        samples = samples.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last).astype(np.float32, copy=False)
        return samples

    def _append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._samples = np.concatenate([self._samples, samples])

    def _encode_range(self, first: int, stop: int, total_mel: int | None) -> np.ndarray:
        """Raw features first..stop-1 from a mel spectrogram of a slice of the recent audio."""
        limit = total_mel if total_mel is not None else 1 << 62  # no end-shift until the stream has ended
        starts = [audio.window_start(j, limit) for j in range(first, stop)]
        slice_mel = max(0, min(starts) - MEL_MARGIN)  # absolute mel frame where the slice begins
        slice_sample = slice_mel * audio.HOP
        if slice_sample < self._sample_base:
            raise AssertionError("audio needed for a window was already dropped")
        wav = self._samples[slice_sample - self._sample_base :]
        mel = audio.melspectrogram(wav)
        windows = np.stack([mel[:, s - slice_mel : s - slice_mel + audio.MEL_WINDOW] for s in starts])
        features = self.engine.encode_windows(windows[:, None].astype(np.float32))
        # Audio before the next window's slice is never needed again. If the stream ends now, windows past
        # the end shift back to the last 16 mel frames, which can start before that window: keep those too
        # (the spectrogram only grows, so this bound only moves forward).
        if total_mel is None:
            end_shift = 1 + self.samples_received // audio.HOP - audio.MEL_WINDOW
            next_slice = max(0, min(audio.window_start(stop, 1 << 62), end_shift) - MEL_MARGIN) * audio.HOP
            self._samples = self._samples[next_slice - self._sample_base :]
            self._sample_base = next_slice
        return features.astype(np.float32, copy=False)

    def _add_raw(self, features: np.ndarray) -> None:
        if self._raw_count == 0:
            self._extend_padded(features[:1])  # SyncTalk_2D repeats the first feature
        self._extend_padded(features)
        self._raw_count += len(features)
        self._last_raw = features[-1]

    def _extend_padded(self, rows: np.ndarray) -> None:
        rows = rows.reshape(len(rows), -1).astype(np.float32, copy=False)
        self._padded = rows if self._padded is None else np.concatenate([self._padded, rows])

    def _ready(self, last_ready: int) -> list[tuple[int, np.ndarray]]:
        """Windows for frames next_frame..last_ready, then drop features no later frame reads."""
        ids = list(range(self.next_frame, last_ready + 1))
        if not ids or self._padded is None:
            return []
        local = [i - self._padded_base for i in ids]
        windows = self.engine.windows(self._padded, local)
        self.next_frame = ids[-1] + 1
        keep_from = max(0, self.next_frame - CONTEXT)  # frame f reads P[f-8 ..]; zeros left of P[0] only
        if keep_from > self._padded_base:
            self._padded = self._padded[keep_from - self._padded_base :]
            self._padded_base = keep_from
        return list(zip(ids, windows, strict=True))
