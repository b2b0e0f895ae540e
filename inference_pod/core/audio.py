"""Audio front end, numerically as SyncTalk_2D computes it.

wav (any rate, any channels) -> 16 kHz mono -> pre-emphasis 0.97 -> |STFT| (n_fft 800, hop 200, hann 800,
centred) -> 80 Slaney mel bands (55-7600 Hz) -> 20*log10(max(1e-5, x)) - 20 -> [-4, 4] -> one 16-mel-frame
window per 25 fps video frame -> AVE encoder (512-d per window) -> first and last feature repeated.

For output frame i the network sees features i-8 ... i+7 (zeros outside the track), reshaped per mode.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import subprocess
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import IO, TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from inference_pod.errors import AudioError

if TYPE_CHECKING:
    import soundfile

log = logging.getLogger(__name__)

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

# Audio is untrusted input: resampling costs in proportion to the rate and a file's header can claim any
# length, so the rate is bounded and the length is checked from the header and again while decoding,
# before anything in proportion to it is allocated.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_CHANNELS = 8
FORMATS = "WAV, FLAC, OGG or MP3 (other formats need ffmpeg: AAC, M4A, Opus, WebM, ...)"
DECODE_BLOCK = 1 << 16  # frames decoded (and downmixed, resampled) at a time
FFMPEG_TIMEOUT_S = 120


def check_format(sample_rate: int, channels: int, source: str = "audio") -> None:
    """The sample rate and channel count every decoder accepts (PCM16 streams too)."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{source} has a sample rate of {sample_rate} Hz; "
                         f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz is accepted")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{source} has {channels} channels; 1..{MAX_CHANNELS} are accepted")


def check_length(samples_16k: int) -> None:
    """The shortest audio with one whole mel window: the same words for a whole track and a live stream."""
    if samples_16k == 0:
        raise AudioError("audio is empty")
    if samples_16k < MIN_SAMPLES:
        raise AudioError(f"audio too short: {samples_16k} samples at 16 kHz, need at least {MIN_SAMPLES}")


def too_long(seconds: float | None, max_seconds: float, source: str = "audio") -> AudioError:
    """``seconds`` None: decoding stopped at the limit, so only "more than" is known."""
    length = f"{seconds:.1f} s" if seconds is not None else f"more than {max_seconds:.0f} s"
    return AudioError(f"{source} is {length} long; the limit is {max_seconds:.0f} s")


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
        check_format(sample_rate, 1)
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


def decode_audio(data: bytes, *, max_seconds: float | None = None, source: str = "audio") -> np.ndarray:
    """Decode an audio file's bytes (WAV, FLAC, OGG, MP3 through libsndfile; else ffmpeg) to 16 kHz mono.

    With ``max_seconds``, longer audio is refused from its header when the header says so, else as soon as
    decoding passes the limit: memory stays within the limit's 16 kHz samples. ``source`` names the input in
    error messages (a file name, "audio_override").
    """
    if not data:
        raise AudioError(f"{source} is empty")
    import soundfile

    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except Exception:  # libsndfile raises its own error types; all mean "not a format it reads"
        return _decode_with_ffmpeg(data, max_seconds, source)
    with sound:
        return _decode_soundfile(sound, max_seconds, source)


def load_audio(path: str, max_seconds: float | None = None) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise AudioError(f"audio file {path} does not exist — check the path") from None
    except IsADirectoryError:
        raise AudioError(f"audio file {path} is a directory") from None
    return decode_audio(data, max_seconds=max_seconds, source=str(path))


def _decode_soundfile(sound: soundfile.SoundFile, max_seconds: float | None, source: str) -> np.ndarray:
    rate, channels = int(sound.samplerate), int(sound.channels)
    check_format(rate, channels, source)
    declared = int(sound.frames)  # from the header; formats that do not know say so with a huge number
    if max_seconds is not None and 0 < declared < 1 << 62 and declared / rate > max_seconds:
        raise too_long(declared / rate, max_seconds, source)
    resampler = None
    if rate != SAMPLE_RATE:
        import soxr

        # Streamed, so only the 16 kHz result is ever held whole (soxr's stream equals its one-shot result).
        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    out, decoded = [], 0
    try:
        while True:
            block = sound.read(DECODE_BLOCK, dtype="float32", always_2d=True)
            last = len(block) < DECODE_BLOCK
            decoded += len(block)
            if max_seconds is not None and decoded > int(max_seconds * rate):
                raise too_long(None, max_seconds, source)
            mono = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
            if not np.all(np.isfinite(mono)):
                raise AudioError(f"{source} contains NaN or infinite samples")
            out.append(resampler.resample_chunk(mono, last=last) if resampler is not None else mono.copy())
            if last:
                break
    except AudioError:
        raise
    except Exception as exc:  # a stream that breaks off or is corrupt past its header
        raise AudioError(f"cannot decode {source}: it is damaged after its header ({exc})") from None
    if decoded == 0:
        raise AudioError(f"{source} holds no samples")
    return np.concatenate(out).astype(np.float32, copy=False)


def _decode_with_ffmpeg(data: bytes, max_seconds: float | None, source: str) -> np.ndarray:
    """ffmpeg decodes and resamples; its output is read as it comes and cut off at the limit."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"cannot decode {source}: it is not {FORMATS.split(' (')[0]}, "
                         "and ffmpeg (for other formats) is not installed")
    proc = subprocess.Popen(
        [ffmpeg, "-nostdin", "-v", "error", "-i", "pipe:0", "-vn", "-f", "f32le", "-ac", "1",
         "-ar", str(SAMPLE_RATE), "pipe:1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdin, stdout, stderr_pipe = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None and stdout is not None and stderr_pipe is not None  # all three opened as PIPE
    stderr: list[bytes] = []
    threads = [threading.Thread(target=_feed, args=(stdin, data), daemon=True),
               threading.Thread(target=lambda: stderr.append(stderr_pipe.read(1 << 16)), daemon=True)]
    timed_out = threading.Event()

    def stop_hung_decoder() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(FFMPEG_TIMEOUT_S, stop_hung_decoder)
    for thread in (*threads, timer):
        thread.start()
    chunks, size = [], 0
    try:
        while chunk := stdout.read(1 << 20):
            size += len(chunk)
            # 4 bytes per f32le sample, one sample of slack
            if max_seconds is not None and size > 4 * (int(max_seconds * SAMPLE_RATE) + 1):
                raise too_long(None, max_seconds, source)
            chunks.append(chunk)
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for thread in threads:
            thread.join(timeout=5)
        for pipe in (stdout, stderr_pipe):
            pipe.close()
    if timed_out.is_set():
        raise AudioError(f"cannot decode {source}: decoding took longer than {FFMPEG_TIMEOUT_S} s")
    samples = np.frombuffer(b"".join(chunks), dtype="<f4")
    if returncode != 0 or samples.size == 0:
        detail = b"".join(stderr).decode(errors="replace").strip()
        log.info("ffmpeg could not decode %s: %s", source, detail[-500:])
        if "does not contain any stream" in detail or (returncode == 0 and samples.size == 0):
            raise AudioError(f"cannot decode {source}: it holds no audio; send {FORMATS}")
        raise AudioError(f"cannot decode {source}: it is not audio in a format this server reads; send {FORMATS}")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{source} contains NaN or infinite samples")
    return samples.copy()


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, ValueError, OSError):
        pass  # ffmpeg stopped reading: it failed, or was stopped at the limit
    finally:
        try:
            pipe.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- mel


def preemphasis(wav: np.ndarray, k: float = PREEMPHASIS) -> np.ndarray:
    """y[n] = x[n] - k x[n-1], y[0] = x[0] (scipy.signal.lfilter([1, -k], [1], x)), in float64."""
    x = np.asarray(wav, dtype=np.float64)
    y = x.copy()
    y[1:] -= k * x[:-1]
    return y


def _hz_to_mel(hz: ArrayLike) -> np.ndarray:
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
    n, dim = features.shape[0], math.prod(features.shape[1:])  # math.prod: this runs for every frame
    if features.ndim < 2 or dim * 2 * FEATURE_CONTEXT != math.prod(shape):
        raise AudioError(
            f"features of shape {features.shape} do not fit the audio input {shape}: "
            f"need {math.prod(shape) // (2 * FEATURE_CONTEXT)} values per frame"
        )
    return n, dim


def feature_windows(features: np.ndarray, indices: Sequence[int] | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """For each output frame i: features i-8 ... i+7 (zeros outside the track), reshaped to the network's
    audio input: (len(indices), *shape) float32. Touches only the rows asked for: a frame of a long
    track costs what a frame of a short one does."""
    n, dim = _check_feature_size(features, shape)
    if len(indices) == 1 and FEATURE_CONTEXT <= (i := int(indices[0])) <= n - FEATURE_CONTEXT:
        # One frame away from the track's ends (a single request, a live stream): a plain slice.
        return features.reshape(n, dim)[i - FEATURE_CONTEXT : i + FEATURE_CONTEXT].astype(np.float32).reshape(1, *shape)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise AudioError(f"frame index out of range 0..{n - 1}")
    rows = idx[:, None] + np.arange(-FEATURE_CONTEXT, FEATURE_CONTEXT)[None, :]
    inside = (rows >= 0) & (rows < n)
    windows = np.zeros((len(idx), 2 * FEATURE_CONTEXT, dim), dtype=np.float32)
    windows[inside] = features.reshape(n, dim)[rows[inside]]
    return windows.reshape(len(idx), *shape)
