"""Audio front end, numerically as SyncTalk_2D computes it.

wav (any rate, any channels) -> 16 kHz mono -> pre-emphasis 0.97 -> |STFT| (n_fft 800, hop 200, hann 800,
centred) -> 80 Slaney mel bands (55-7600 Hz) -> 20*log10(max(1e-5, x)) - 20 -> [-4, 4] -> one 16-mel-frame
window per 25 fps video frame -> AVE encoder (512-d per window) -> first and last feature repeated.

For output frame i the network sees features i-8 ... i+7 (zeros outside the track), reshaped per mode.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from functools import lru_cache

import numpy as np

from inference_pod.errors import AudioError

SAMPLE_RATE = 16_000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS = 4.0
MEL_WINDOW = 16  # mel frames per video frame's window
MEL_FPS = 80  # mel frames per second (16000 / 200)
VIDEO_FPS = 25
FEATURE_CONTEXT = 8  # features i-8 ... i+7 feed output frame i
MIN_SAMPLES = (MEL_WINDOW - 1) * HOP  # shortest audio that yields one full mel window (centred STFT)


# ---------------------------------------------------------------------------------------------- decoding


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Average the channels and resample to 16 kHz with soxr's HQ filter (what librosa.load uses)."""
    if sample_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {sample_rate}")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    elif samples.ndim != 1:
        raise AudioError(f"audio must be (samples,) or (samples, channels), got shape {samples.shape}")
    if samples.size == 0:
        raise AudioError("audio is empty")
    if not np.all(np.isfinite(samples)):
        raise AudioError("audio contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return samples


def pcm16_to_float(data: bytes, sample_rate: int, channels: int = 1) -> np.ndarray:
    """Little-endian 16-bit PCM (as streamed by clients) to 16 kHz mono float32."""
    if channels < 1:
        raise AudioError(f"channel count must be >= 1, got {channels}")
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioError(f"PCM16 data of {len(data)} bytes is not a whole number of {channels}-channel frames")
    pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return to_mono_16k(pcm.reshape(-1, channels), sample_rate)


def decode_audio(data: bytes) -> np.ndarray:
    """Decode an audio file's bytes (WAV, FLAC, OGG, MP3 through libsndfile; else ffmpeg) to 16 kHz mono."""
    if not data:
        raise AudioError("audio is empty")
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises its own error types; all mean "cannot decode"
        samples, rate = _decode_with_ffmpeg(data, reason=str(exc))
    return to_mono_16k(samples, rate)


def load_audio(path: str) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode_audio(fh.read())


def _decode_with_ffmpeg(data: bytes, reason: str) -> tuple[np.ndarray, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"cannot decode audio ({reason}) and ffmpeg is not installed")
    proc = subprocess.run(
        [ffmpeg, "-v", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"],
        input=data, capture_output=True, timeout=120, check=False,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise AudioError(f"cannot decode audio: {proc.stderr.decode(errors='replace').strip() or reason}")
    return np.frombuffer(proc.stdout, dtype="<f4").reshape(-1, 1), SAMPLE_RATE


# ---------------------------------------------------------------------------------------------- mel


def preemphasis(wav: np.ndarray, k: float = PREEMPHASIS) -> np.ndarray:
    """y[n] = x[n] - k x[n-1], y[0] = x[0] (scipy.signal.lfilter([1, -k], [1], x)), in float64."""
    x = np.asarray(wav, dtype=np.float64)
    y = x.copy()
    y[1:] -= k * x[:-1]
    return y


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    logstep = np.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = hz >= min_log_hz
    mel = np.where(log_part, min_log_hz / f_sp + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mel)
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """(80, 401) triangular filters on the Slaney scale with Slaney (area) normalisation, float32."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2 : N_MELS + 2] - mel_pts[:N_MELS]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    n = np.arange(WIN)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN)  # periodic Hann, as scipy.signal.get_window


def stft_magnitude(y: np.ndarray) -> np.ndarray:
    """|STFT| (401, T), centred with zero padding of n_fft/2 on both sides, T = 1 + len(y) // hop."""
    padded = np.pad(np.asarray(y, dtype=np.float64), N_FFT // 2, mode="constant")
    n_frames = 1 + (padded.size - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP, padded.strides[0]), writeable=False
    )
    return np.abs(np.fft.rfft(frames * _hann(), axis=1)).T


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Normalised log-mel spectrogram, (80, T) float64 in [-4, 4]."""
    mel = mel_basis() @ stft_magnitude(preemphasis(wav))
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    return np.clip(2 * MAX_ABS * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS, -MAX_ABS, MAX_ABS)


# ---------------------------------------------------------------------------------------------- windows


def window_count(n_mel_frames: int) -> int:
    """How many 16-frame mel windows (one per 25 fps video frame) SyncTalk_2D takes from a spectrogram."""
    if n_mel_frames < MEL_WINDOW:
        raise AudioError(f"audio too short: {n_mel_frames} mel frames, need at least {MEL_WINDOW} (~0.2 s)")
    return int((n_mel_frames - MEL_WINDOW) / 80.0 * float(VIDEO_FPS)) + 2


def window_start(index: int, n_mel_frames: int) -> int:
    """First mel frame of window ``index``; windows that would run past the end are shifted back."""
    start = int(80.0 * (index / float(VIDEO_FPS)))
    return min(start, n_mel_frames - MEL_WINDOW)


def mel_windows(mel: np.ndarray) -> np.ndarray:
    """(80, T) spectrogram -> (n, 1, 80, 16) float32 windows, n = window_count(T)."""
    n_frames = mel.shape[1]
    starts = [window_start(i, n_frames) for i in range(window_count(n_frames))]
    windows = np.stack([mel[:, s : s + MEL_WINDOW] for s in starts])
    return windows[:, None].astype(np.float32)


def pad_features(features: np.ndarray) -> np.ndarray:
    """Repeat the first and last feature: SyncTalk_2D's track has one more frame at each end."""
    return np.concatenate([features[:1], features, features[-1:]], axis=0)


def frame_count(n_samples: int) -> int:
    """Output frames SyncTalk_2D renders for ``n_samples`` of 16 kHz audio."""
    return window_count(1 + n_samples // HOP) + 2


def _check_feature_size(features: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int]:
    n, dim = features.shape[0], int(np.prod(features.shape[1:]))
    if features.ndim < 2 or dim * 2 * FEATURE_CONTEXT != int(np.prod(shape)):
        raise AudioError(
            f"features of shape {features.shape} do not fit the audio input {shape}: "
            f"need {int(np.prod(shape)) // (2 * FEATURE_CONTEXT)} values per frame"
        )
    return n, dim


def feature_windows(features: np.ndarray, indices, shape: tuple[int, ...]) -> np.ndarray:
    """For each output frame i: features i-8 ... i+7 (zeros outside the track), reshaped to the network's
    audio input: (len(indices), *shape) float32."""
    n, dim = _check_feature_size(features, shape)
    padded = np.zeros((n + 2 * FEATURE_CONTEXT, dim), dtype=np.float32)
    padded[FEATURE_CONTEXT : FEATURE_CONTEXT + n] = features.reshape(n, dim)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise AudioError(f"frame index out of range 0..{n - 1}")
    rows = idx[:, None] + np.arange(2 * FEATURE_CONTEXT)[None, :]
    return padded[rows].reshape(len(idx), *shape)
