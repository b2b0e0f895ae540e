"""A live session's audio timeline, and the frame windows SyncTalk_2D reads from it.

A session is one continuous track: the client's speech where it was placed, digital silence everywhere
else, before the session's start included. Frame i (tick i, at i / 25 s) plays samples 640 i .. 640 i + 639
and reads SyncTalk_2D's padded features i-8 .. i+7, i.e. raw features i-9 .. i+6; raw feature j is the AVE
encoding of 16 mel frames from ``window_start(j)``; mel frame t reads samples 200 t - 401 .. 200 t + 399
(the centred STFT, plus one sample for the pre-emphasis). So frame i depends on a known span of samples
(``frame_support``), about 0.36 s before its own time and 0.45 s after it.

Because the track never ends, there is no end-of-track handling: the windows after an utterance read the
silence that really follows it (or the next utterance, if one was queued), so the mouth closes (or goes on)
the way the network learnt from continuous speech. A frame whose span holds no client audio is *silent*:
every feature it reads is the encoding of silence, so its window is the same for every such frame and its
image depends only on its template (``serving.session`` caches those).

Memory is bounded by the caller: samples and features behind the oldest frame still to be emitted are
dropped (``trim``), and the caller limits how far ahead audio may be queued.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from inference_pod.core import audio
from inference_pod.core.live_features import FeatureEncoder as LiveEncoder
from inference_pod.errors import AudioError

SAMPLES_PER_TICK = audio.SAMPLE_RATE // audio.VIDEO_FPS  # 640: one 25 fps frame of 16 kHz audio
CONTEXT = audio.FEATURE_CONTEXT  # 8: padded features i-8 .. i+7 feed frame i
MEL_MARGIN = 3  # mel frames at a slice's start that its zero padding / first pre-emphasis sample reach
MAX_FEATURES_PER_STEP = 25  # raw features encoded in one step (a second of speech): short CPU jobs


def mel_start(j: int) -> int:
    """First mel frame of raw feature ``j`` (SyncTalk_2D's int(3.2 j); negative j lie in the silent past)."""
    return audio.window_start(j, 1 << 62) if j >= 0 else (16 * j) // 5


def feature_support(j: int) -> tuple[int, int]:
    """Samples [first, end) that raw feature ``j`` depends on."""
    first_mel = mel_start(j)
    return (audio.HOP * first_mel - audio.N_FFT // 2 - 1,
            audio.HOP * (first_mel + audio.MEL_WINDOW - 1) + audio.N_FFT // 2)


def frame_features(i: int) -> range:
    """Raw features frame ``i`` reads: SyncTalk_2D's padded P[i-8 .. i+7] are raw F[i-9 .. i+6]."""
    return range(i - CONTEXT - 1, i + CONTEXT - 1)


def frame_support(i: int) -> tuple[int, int]:
    """Samples [first, end) that frame ``i``'s audio window depends on."""
    features = frame_features(i)
    return feature_support(features[0])[0], feature_support(features[-1])[1]


def tick_samples(k: int) -> tuple[int, int]:
    """Samples [first, end) that play with tick ``k``."""
    return k * SAMPLES_PER_TICK, (k + 1) * SAMPLES_PER_TICK



class FeatureEncoder(LiveEncoder, Protocol):
    """What a session's timeline needs of an engine: a live track's calls and the shape of one audio window."""

    audio_shape: tuple[int, ...]

def silence_feature(engine: FeatureEncoder) -> np.ndarray:
    """The AVE encoding of silence (a window of the mel spectrogram of digital zeros), (512,) float32."""
    mel = audio.melspectrogram(np.zeros(audio.HOP * (audio.MEL_WINDOW + 2 * MEL_MARGIN), np.float32))
    window = mel[:, MEL_MARGIN : MEL_MARGIN + audio.MEL_WINDOW][None, None].astype(np.float32)
    return engine.encode_windows(window)[0].reshape(-1).astype(np.float32)


class SessionTimeline:
    """The session's samples (PCM16 16 kHz mono) from ``base`` to ``committed``, which client audio spans
    them, and the raw features computed for frames that hear client audio. Not thread-safe: mutate it on
    one thread; ``feature_job`` hands a copy of the samples to another."""

    def __init__(self, engine: FeatureEncoder, silence: np.ndarray) -> None:
        self._encode = engine.encode_windows
        self.audio_shape = tuple(engine.audio_shape)
        self.silence = silence
        self._pcm = np.zeros(0, np.int16)
        self.base = 0  # timeline sample of _pcm[0]
        self.committed = 0  # end of the timeline so far: audio arriving now is placed here
        self._speech: list[tuple[int, int, int]] = []  # (start, end, utterance): client audio, in order
        self._features: dict[int, np.ndarray] = {}
        self._trimmed: dict[int, int] = {}  # utterance -> its samples played and already forgotten by trim

    # -------------------------------------------------------------------------------------- writing

    def commit_silence(self, end: int) -> None:
        """Extend the timeline with silence up to sample ``end`` (nothing if it already reaches it)."""
        if end > self.committed:
            self._pcm = np.concatenate([self._pcm, np.zeros(end - self.committed, np.int16)])
            self.committed = end

    def append(self, pcm16: bytes, utterance: int) -> tuple[int, int]:
        """Place client audio (whole 16-bit samples) at the end of the timeline; returns its [start, end)."""
        if len(pcm16) % 2:
            raise AudioError(f"session audio must be whole 16-bit samples: a message of {len(pcm16)} bytes "
                             "is odd")
        samples = np.frombuffer(pcm16, dtype="<i2").astype(np.int16)
        start, end = self.committed, self.committed + len(samples)
        if len(samples):
            self._pcm = np.concatenate([self._pcm, samples])
            self.committed = end
            if self._speech and self._speech[-1][1] == start and self._speech[-1][2] == utterance:
                self._speech[-1] = (self._speech[-1][0], end, utterance)
            else:
                self._speech.append((start, end, utterance))
        return start, end

    def erase(self, at: int) -> tuple[dict[int, int], dict[int, int]]:
        """Barge-in: the timeline ends at sample ``at`` and holds no client audio any more (the frames after
        it hear silence at once). Returns samples played (before ``at``) and dropped, per utterance."""
        played: dict[int, int] = dict(self._trimmed)
        dropped: dict[int, int] = {}
        self._trimmed.clear()
        for start, end, utterance in self._speech:
            played[utterance] = played.get(utterance, 0) + max(0, min(end, at) - start)
            dropped[utterance] = dropped.get(utterance, 0) + max(0, end - max(start, at))
        self._speech.clear()
        self._features.clear()
        keep = max(0, min(at, self.committed) - self.base)
        self._pcm = np.zeros(keep, np.int16)  # what is kept is only ever read back as played audio: silence
        self.committed = self.base + keep
        return played, dropped

    def trim(self, before_frame: int) -> None:
        """Forget what no frame from ``before_frame`` on reads or plays."""
        first = min(frame_support(before_frame)[0], tick_samples(before_frame)[0])
        if first > self.base:
            self._pcm = self._pcm[first - self.base :]
            self.base = first
        while self._speech and self._speech[0][1] <= first:
            start, end, utterance = self._speech.pop(0)
            self._trimmed[utterance] = self._trimmed.get(utterance, 0) + end - start  # still counts as played
        oldest = frame_features(before_frame)[0]
        for j in [j for j in self._features if j < oldest]:
            del self._features[j]

    def forget_utterance(self, utterance: int) -> None:
        """The utterance has finished playing: a later barge-in does not count it."""
        self._trimmed.pop(utterance, None)

    # -------------------------------------------------------------------------------------- reading

    def queued_after(self, at: int) -> int:
        """Client samples placed at or after sample ``at`` (not played yet)."""
        return sum(max(0, e - max(s, at)) for s, e, _ in self._speech)

    def _hears_speech(self, first: int, end: int) -> bool:
        return any(s < end and first < e for s, e, _ in self._speech)

    def is_silent(self, i: int) -> bool:
        """Frame ``i`` reads no client audio: its window is the silence window."""
        return not self._hears_speech(*frame_support(i))

    def is_ready(self, i: int) -> bool:
        """Every sample frame ``i`` reads is on the timeline (audio arriving now cannot change it)."""
        return frame_support(i)[1] <= self.committed

    def tick_pcm(self, k: int) -> bytes:
        """The PCM16 that plays with tick ``k``."""
        first, end = tick_samples(k)
        if first < self.base or end > self.committed:
            raise AssertionError(f"tick {k}'s audio is not held ({self.base}..{self.committed})")
        return self._pcm[first - self.base : end - self.base].astype("<i2").tobytes()

    def missing_features(self, i: int) -> list[int]:
        """Raw features frame ``i`` needs that hear client audio and are not computed yet."""
        return [j for j in frame_features(i) if j >= 0 and j not in self._features
                and self._hears_speech(*feature_support(j))]

    def feature_job(self, i: int) -> Callable[[], dict[int, np.ndarray]] | None:
        """A function (for a worker thread) that encodes the missing features of frame ``i`` and of the frames
        after it whose audio is committed (up to MAX_FEATURES_PER_STEP), from a copy of the samples, and
        returns {j: feature}; store its result with ``add_features``. None when nothing is missing."""
        missing = self.missing_features(i)
        if not missing:
            return None
        first_j = missing[0]
        js = [j for j in range(first_j, first_j + MAX_FEATURES_PER_STEP)
              if feature_support(j)[1] <= self.committed and j not in self._features]
        starts = [mel_start(j) for j in js]
        slice_mel = starts[0] - MEL_MARGIN
        first, end = audio.HOP * slice_mel, feature_support(js[-1])[1]
        # Samples before ``base`` (trimmed) or before 0 (the silent past) are zeros here; trimmed ones only
        # reach the slice's first MEL_MARGIN mel frames, which no window uses.
        wav = np.zeros(end - first, np.float32)
        lo, hi = max(first, self.base), min(end, self.committed)
        if hi > lo:
            wav[lo - first : hi - first] = self._pcm[lo - self.base : hi - self.base] / np.float32(32768.0)
        encode = self._encode

        def job() -> dict[int, np.ndarray]:
            mel = audio.melspectrogram(wav)
            windows = np.stack([mel[:, s - slice_mel : s - slice_mel + audio.MEL_WINDOW] for s in starts])
            features = encode(windows[:, None].astype(np.float32))
            return {j: f.reshape(-1).astype(np.float32) for j, f in zip(js, features, strict=True)}

        return job

    def add_features(self, features: dict[int, np.ndarray]) -> None:
        self._features.update(features)

    def window(self, i: int) -> np.ndarray:
        """Frame ``i``'s network audio input, (*audio_shape) float32: its 16 features, silence where silent."""
        if self.missing_features(i):
            raise AssertionError(f"frame {i}'s features are not computed yet (feature_job first)")
        rows = [self._features[j] if j in self._features else self.silence for j in frame_features(i)]
        return np.stack(rows).reshape(self.audio_shape).astype(np.float32, copy=False)

    def silence_window(self) -> np.ndarray:
        return np.broadcast_to(self.silence, (2 * CONTEXT, len(self.silence))).reshape(self.audio_shape).astype(
            np.float32)
