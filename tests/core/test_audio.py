"""The audio path step by step against SyncTalk_2D's formulas (librosa/scipy as the reference)."""

from __future__ import annotations

import io

import librosa
import numpy as np
import pytest
import soundfile
from scipy import signal
from serving_support import claimed_wav, silent_flac

from inference_pod.bench import naive
from inference_pod.core import audio
from inference_pod.errors import AudioError


@pytest.fixture(scope="module")
def speechish() -> np.ndarray:
    """1.3 s of a harmonic tone with an amplitude envelope plus noise, 16 kHz float32."""
    rng = np.random.default_rng(7)
    t = np.arange(int(1.3 * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 910, 2300), start=1))
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    return (0.2 * env * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_preemphasis_is_lfilter(speechish):
    expected = signal.lfilter([1, -0.97], [1], speechish)
    np.testing.assert_allclose(audio.preemphasis(speechish), expected, rtol=0, atol=1e-12)


def test_stft_magnitude_is_librosa_centred_stft(speechish):
    y = audio.preemphasis(speechish)
    expected = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, center=True, pad_mode="constant"))
    ours = audio.stft_magnitude(y)
    assert ours.shape == expected.shape == (401, 1 + len(y) // 200)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


def test_mel_basis_is_slaney_55_7600():
    expected = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600, htk=False, norm="slaney")
    np.testing.assert_allclose(audio.mel_basis(), expected, rtol=1e-5, atol=1e-8)


def test_melspectrogram_matches_synctalk_formula(speechish):
    d = librosa.stft(y=signal.lfilter([1, -0.97], [1], speechish), n_fft=800, hop_length=200, win_length=800)
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ np.abs(d)
    s = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    expected = np.clip(8 * ((s + 100) / 100) - 4, -4, 4)
    ours = audio.melspectrogram(speechish)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert ours.min() >= -4 and ours.max() <= 4


def test_silence_hits_the_floor():
    mel = audio.melspectrogram(np.zeros(4000, dtype=np.float32))
    # 20*log10(1e-5) - 20 = -120 dB, below the -100 dB floor: clipped to -4
    assert np.all(mel == -4.0)


def test_any_rate_and_channels_become_16k_mono_like_librosa_load(tmp_path, speechish):
    stereo_44k = np.stack([speechish, 0.5 * speechish], axis=1)
    stereo_44k = librosa.resample(stereo_44k.T, orig_sr=16000, target_sr=44100).T.astype(np.float32)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo_44k, 44100, subtype="FLOAT")
    expected, sr = librosa.load(path, sr=16000)
    ours = audio.load_audio(str(path))
    assert sr == 16000 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_pcm16_decoding_interleaved_channels():
    frames = np.array([[16384, -16384], [32767, 32767], [-32768, 0]], dtype="<i2")
    out = audio.pcm16_to_float(frames.tobytes(), 16000, channels=2)
    np.testing.assert_allclose(out, [0.0, 32767 / 32768, -0.5], atol=1e-7)


@pytest.mark.parametrize(
    "data, rate, channels, message",
    [(b"\x00\x01\x02", 16000, 1, "whole number"), (b"\x00\x00" * 4, 16000, 0, "channel count"),
     (b"\x00\x00" * 4, 0, 1, "sample rate"), (b"", 16000, 1, "empty")],
)
def test_pcm16_rejects_bad_input(data, rate, channels, message):
    with pytest.raises(AudioError, match=message):
        audio.pcm16_to_float(data, rate, channels)


def test_decode_rejects_garbage_and_empty():
    with pytest.raises(AudioError, match="empty"):
        audio.decode_audio(b"")
    with pytest.raises(AudioError, match="cannot decode"):
        audio.decode_audio(b"this is not audio at all" * 10)


def test_decode_wav_bytes(speechish):
    buf = io.BytesIO()
    soundfile.write(buf, speechish, 16000, format="WAV", subtype="PCM_16")
    out = audio.decode_audio(buf.getvalue())
    np.testing.assert_allclose(out, speechish, atol=1 / 32768 + 1e-6)


def test_window_count_and_indexing_at_both_ends():
    n_mel = 100
    mel = np.arange(80 * n_mel, dtype=np.float64).reshape(80, n_mel)
    count = audio.window_count(n_mel)
    assert count == int((100 - 16) / 80 * 25) + 2 == 28
    windows = audio.mel_windows(mel)
    assert windows.shape == (28, 1, 80, 16)
    np.testing.assert_array_equal(windows[0, 0], mel[:, 0:16])
    np.testing.assert_array_equal(windows[1, 0], mel[:, 3:19])  # int(80 * 1/25) = 3
    np.testing.assert_array_equal(windows[26, 0], mel[:, 83:99])  # int(80 * 26/25) = 83
    # window 27 would start at int(86.4) = 86 and run past 100: shifted back to end at 100
    np.testing.assert_array_equal(windows[27, 0], mel[:, 84:100])


def test_too_short_audio_is_refused():
    with pytest.raises(AudioError, match="too short"):
        audio.window_count(15)


def test_frame_count_matches_the_padded_track(speechish):
    mel = audio.melspectrogram(speechish)
    assert audio.frame_count(len(speechish)) == len(audio.mel_windows(mel)) + 2


def test_pad_features_repeats_first_and_last():
    f = np.arange(12, dtype=np.float32).reshape(4, 3)
    padded = audio.pad_features(f)
    assert padded.shape == (6, 3)
    np.testing.assert_array_equal(padded[0], f[0])
    np.testing.assert_array_equal(padded[-1], f[-1])
    np.testing.assert_array_equal(padded[1:-1], f)


def test_feature_window_zero_fills_at_both_ends():
    n, dim = 20, 512
    f = (np.arange(n, dtype=np.float32)[:, None] + 1) * np.ones((1, dim), np.float32)
    first = audio.feature_windows(f, [0], (32, 16, 16))[0].reshape(16, dim)
    assert np.all(first[:8] == 0) and np.array_equal(first[8:, 0], np.arange(1, 9))
    last = audio.feature_windows(f, [n - 1], (32, 16, 16))[0].reshape(16, dim)
    assert np.array_equal(last[:9, 0], np.arange(n - 8, n + 1)) and np.all(last[9:] == 0)
    middle = audio.feature_windows(f, [10], (32, 16, 16))[0].reshape(16, dim)
    assert np.array_equal(middle[:, 0], np.arange(3, 19))


def test_feature_windows_equal_synctalks_window_and_check_range():
    f = np.random.default_rng(0).standard_normal((13, 2, 1024)).astype(np.float32)  # HuBERT layout
    ids = [0, 3, 12, 7]
    stacked = audio.feature_windows(f, ids, (32, 32, 32))
    for k, i in enumerate(ids):
        np.testing.assert_array_equal(stacked[k], naive.synctalk_audio_window(f, i).reshape(32, 32, 32))
    with pytest.raises(AudioError, match="out of range"):
        audio.feature_windows(f, [13], (32, 32, 32))
    with pytest.raises(AudioError, match="do not fit"):
        audio.feature_windows(f, [0], (32, 16, 16))


# ---------------------------------------------------------------------------------------------- hostile input
# Audio is untrusted: what a header claims must not decide what the decoder allocates. Each case runs the
# real decoder in a fresh process and measures that process's own peak RSS (VmHWM) while the input is refused.

_PEAK_PROBE = r"""
import sys
import numpy as np
from inference_pod.core import audio
from inference_pod.errors import AudioError
from inference_pod.serving.pipeline import AudioInput

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

rate = 44100  # warm up: libsndfile, soxr's stream and ffmpeg's pipe are all loaded before the baseline
import io, soundfile
buf = io.BytesIO()
soundfile.write(buf, np.zeros(rate, np.float32), rate, format="WAV")
audio.decode_audio(buf.getvalue(), max_seconds=600)
before = peak_kib()
data = open(sys.argv[1], "rb").read()
try:
    AudioInput(kind="file", data=data).decode(max_seconds=600)
    print("DECODED")
except AudioError as exc:
    print("REFUSED", exc)
print((peak_kib() - before) // 1024)
"""


def _peak_while_decoding(path) -> tuple[str, int]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    verdict, grown_mib = proc.stdout.strip().splitlines()
    return verdict, int(grown_mib)


def test_a_one_hertz_wav_is_refused_from_its_header_without_growing(tmp_path):
    # 78 KiB claiming 40,000 s at 1 Hz: resampled to 16 kHz it would be 640 million samples (2.5 GB).
    path = tmp_path / "one-hertz.wav"
    path.write_bytes(claimed_wav(rate=1, samples=40_000))
    assert soundfile.info(path).samplerate == 1
    verdict, grown = _peak_while_decoding(path)
    assert verdict.startswith("REFUSED") and "sample rate of 1 Hz" in verdict and "8000..192000" in verdict
    assert grown < 40, f"peak RSS grew by {grown} MiB while refusing"


def test_an_hour_of_silent_flac_is_refused_from_its_header(tmp_path):
    path = tmp_path / "hour.flac"
    silent_flac(path, 3600)
    assert path.stat().st_size < 200_000  # small on the wire, 28.8 million samples decoded
    verdict, grown = _peak_while_decoding(path)
    assert verdict == "REFUSED audio is 3600.0 s long; the limit is 600 s"
    assert grown < 40, f"peak RSS grew by {grown} MiB while refusing"


def test_a_flac_that_hides_its_length_is_cut_off_while_decoding(tmp_path):
    path = tmp_path / "hidden.flac"
    silent_flac(path, 3600)
    data = bytearray(path.read_bytes())
    # STREAMINFO's 36-bit total-samples field (0 = unknown) ends byte 25 of the file.
    word = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = word.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    verdict, grown = _peak_while_decoding(path)
    assert verdict == "REFUSED audio is more than 600 s long; the limit is 600 s"
    assert grown < 60, f"peak RSS grew by {grown} MiB while refusing"


def test_ffmpeg_output_is_cut_off_at_the_limit(tmp_path):
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    path = tmp_path / "hour.mka"  # Matroska: not for libsndfile, so the ffmpeg path decodes it
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "3600",
                    "-c:a", "flac", "-f", "matroska", str(path)], check=True, timeout=120)
    verdict, grown = _peak_while_decoding(path)
    assert verdict == "REFUSED audio is more than 600 s long; the limit is 600 s"
    assert grown < 60, f"peak RSS grew by {grown} MiB while refusing"


def test_limits_leave_audio_within_them_alone(tmp_path, speechish):
    buf = io.BytesIO()
    soundfile.write(buf, speechish, 16000, format="FLAC")
    out = audio.decode_audio(buf.getvalue(), max_seconds=2)
    np.testing.assert_allclose(out, speechish, atol=1 / 32768 + 1e-6)
    with pytest.raises(AudioError, match=r"^audio is 1\.3 s long; the limit is 1 s$"):
        audio.decode_audio(buf.getvalue(), max_seconds=1)


def test_undecodable_audio_names_the_input_and_the_formats_that_work(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError) as refused:
        audio.load_audio(str(path))
    message = str(refused.value)
    assert str(path) in message and "WAV, FLAC, OGG or MP3" in message
    assert "pipe:0" not in message and "Invalid data" not in message
    with pytest.raises(AudioError, match=r"audio file .*missing\.wav does not exist"):
        audio.load_audio(str(tmp_path / "missing.wav"))
