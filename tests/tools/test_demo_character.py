"""The demo character: deterministic drawing, plausible landmarks, speech-like audio, matching features."""

from __future__ import annotations

import io
import shutil
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference_pod.core import audio
from inference_pod.core.model import AveAudioEncoder, LipSyncUNet, load_strict
from inference_pod.errors import InvalidInput
from inference_pod.package import verify_package
from inference_pod.tools.demo_character import (
    DEFAULT_SPEECH,
    Utterance,
    build_demo_package,
    default_speech,
    demo_audio_encoder,
    espeak,
    mouth_track,
    speech_like_audio,
    speech_track,
    write_checkpoints,
    write_synctalk_dataset,
)
from inference_pod.tools.synctalk_dataset import ave_features, encode_wav_pcm16, read_dataset, read_landmarks


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_character(tmp_path):
    kwargs = dict(frames=4, size=(48, 40), audio_seconds=0.5)
    a = _tree(write_synctalk_dataset(tmp_path / "a", seed=7, **kwargs))
    b = _tree(write_synctalk_dataset(tmp_path / "b", seed=7, **kwargs))
    c = _tree(write_synctalk_dataset(tmp_path / "c", seed=8, **kwargs))
    assert set(a) == {"aud.wav", "aud_ave.npy"} | {f"full_body_img/{i}.jpg" for i in range(4)} | {
        f"landmarks/{i}.lms" for i in range(4)
    }
    assert a == b
    assert a["full_body_img/0.jpg"] != c["full_body_img/0.jpg"] and a["aud.wav"] != c["aud.wav"]


def test_frames_and_landmarks_are_synctalk_2d_shaped(synctalk_dataset_dir):
    dataset = read_dataset(synctalk_dataset_dir)  # 12 frames, 64x64
    first = cv2.imread(str(dataset.frame_paths[0]))
    assert first.shape == (64, 64, 3) and first.std() > 20  # a drawn picture, not a flat fill
    openings = []
    for i, box in enumerate(dataset.crop_boxes):
        lms = read_landmarks(synctalk_dataset_dir / "landmarks" / f"{i}.lms")
        x1, y1, x2, y2 = box
        mouth = lms[77:105]
        # The crop (SyncTalk_2D's rule) holds the whole mouth and starts above it, below the eyes.
        assert np.all((mouth[:, 0] >= x1) & (mouth[:, 0] < x2) & (mouth[:, 1] >= y1) & (mouth[:, 1] < y2))
        assert lms[61:77, 1].max() < y1 < mouth[:, 1].min()
        assert x2 - x1 > 20
        openings.append(lms[97:105, 1].max() - lms[97:105, 1].min())
    openings = np.array(openings)
    assert openings.max() - openings.min() > 1.0  # the mouth moves ...
    assert np.abs(np.diff(openings)).max() < 0.5 * (openings.max() - openings.min()) + 0.5  # ... smoothly


def test_audio_is_speech_like(tmp_path):
    wav = speech_like_audio(3.0, seed=1)
    assert wav.dtype == np.float32 and wav.shape == (48000,)
    assert np.array_equal(wav, speech_like_audio(3.0, seed=1))
    assert 0.5 < np.abs(wav).max() <= 0.6
    energy = np.sqrt(np.mean(wav[: 48000 // 400 * 400].reshape(-1, 400) ** 2, axis=1))  # 25 ms frames
    assert (energy < 1e-3).mean() > 0.05  # pauses
    assert (energy > 0.05).mean() > 0.3  # voiced syllables
    spectrum = np.abs(np.fft.rfft(wav))
    freqs = np.fft.rfftfreq(wav.size, 1 / 16000)
    assert spectrum[(freqs > 80) & (freqs < 1000)].sum() > spectrum[freqs > 4000].sum()  # speech-like tilt
    with pytest.raises(InvalidInput, match="at least"):
        speech_like_audio(0.1, seed=1)


def test_features_are_the_encoder_outputs_of_the_wav(synctalk_dataset_dir):
    data = (synctalk_dataset_dir / "aud.wav").read_bytes()
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()) == (16000, 1, 2, 16000)
    samples = audio.decode_audio(data)
    features = np.load(synctalk_dataset_dir / "aud_ave.npy", allow_pickle=False)
    n_windows = audio.window_count(audio.melspectrogram(samples).shape[1])
    assert features.dtype == np.float32 and features.shape == (n_windows, 512)
    assert np.allclose(features, ave_features(samples, demo_audio_encoder(0)), atol=1e-6)


def test_checkpoints_load_strictly_as_synctalk_2d_files(tmp_path):
    unet_path, encoder_path = write_checkpoints(tmp_path, "ave", 4, seed=3)
    unet_state = torch.load(unet_path, weights_only=True)
    encoder_state = torch.load(encoder_path, weights_only=True)
    assert "inc.inconv.0.conv.0.weight" in unet_state
    assert "0.conv_block.0.weight" in encoder_state and not any(k.startswith("audio_encoder.") for k in encoder_state)
    load_strict(LipSyncUNet("ave", 4), unet_state, "U-Net")
    load_strict(AveAudioEncoder(), encoder_state, "audio encoder")
    again = torch.load(write_checkpoints(tmp_path / "again", "ave", 4, seed=3)[0], weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in unet_state.items())


def test_demo_package_is_reproducible_and_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    kwargs = dict(width=4, frames=3, seed=2, size=(48, 48), audio_seconds=0.5)
    manifest = build_demo_package("demo-x", tmp_path / "a.zip", **kwargs)
    build_demo_package("demo-x", tmp_path / "b.zip", **kwargs)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert verify_package(tmp_path / "a.zip") == manifest
    assert (manifest.model_width, manifest.frame_count, manifest.image_size) == (4, 3, (48, 48))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(frames=0), "at least one frame"), (dict(size=(16, 64)), "at least 32x32")],
)
def test_demo_refuses_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(InvalidInput, match=message):
        write_synctalk_dataset(tmp_path / "d", **kwargs)


def test_the_drawn_mouth_follows_the_voice(tmp_path):
    """Loud frames open the mouth, silent ones close it: the opening is a function of the audio at that frame."""
    sr = audio.SAMPLE_RATE
    voice = speech_like_audio(2.0, seed=4)
    silence_then_voice = np.concatenate([np.zeros(sr, np.float32), voice])
    n = audio.frame_count(len(silence_then_voice))
    mouth = mouth_track(silence_then_voice, n)
    assert mouth.shape == (n, 2) and mouth.dtype == np.float32
    assert np.all(mouth[:20, 0] == 0) and np.all(mouth[:20, 1] == 1)  # the first second is silent: closed, neutral
    assert mouth[30:, 0].max() > 0.8 and 0.85 <= mouth[:, 1].min() and mouth[:, 1].max() <= 1.15
    # Frame i depends on the audio near frame i only: the same voice a second later moves the mouth a second later.
    assert np.allclose(mouth_track(voice, n - 25)[5:-5], mouth[30:-5], atol=0.01)

    dataset = write_synctalk_dataset(tmp_path / "d", frames=None, size=(96, 96), seed=0, speech=silence_then_voice)
    openings = np.array([np.ptp(read_landmarks(dataset / "landmarks" / f"{i}.lms")[97:105, 1]) for i in range(n)])
    assert len(list((dataset / "full_body_img").iterdir())) == n  # one frame per frame of the track
    assert np.corrcoef(openings, mouth[:, 0])[0, 1] > 0.99


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (make setup)")
def test_espeak_speech_and_the_default_voice():
    line = Utterance("Hello there.", "en-gb", 150, 40)
    wav = espeak(line)
    assert wav.dtype == np.float32 and 0.5 < len(wav) / audio.SAMPLE_RATE < 3 and np.abs(wav).max() > 0.1
    assert np.array_equal(wav, espeak(line))
    track = speech_track([line, line], pause_s=0.5)
    assert len(track) == len(wav) * 2 + 3 * audio.SAMPLE_RATE // 2
    assert np.array_equal(default_speech(), speech_track(DEFAULT_SPEECH))
    assert len(default_speech(audio_seconds=1.0)) == audio.SAMPLE_RATE  # a length asked for: synthetic syllables


def test_trained_weights_only_for_the_character_they_were_trained_on(tmp_path):
    with pytest.raises(InvalidInput, match="--random-weights"):
        build_demo_package("demo", tmp_path / "x.zip", width=8, frames=2, trained=True)
    assert not (tmp_path / "x.zip").exists()


def test_cli_builds_the_trained_demo_by_default_and_random_weights_on_request(tmp_path, capsys):
    from inference_pod import cli
    from inference_pod.package import open_package
    from inference_pod.tools.demo_character import TRAINED

    assert cli.main(["package", "demo", "--out", str(tmp_path / "t.zip"), "--frames", "4", "--audio-seconds", "0.5"]) == 0
    trained = open_package(tmp_path / "t.zip", cache_dir=tmp_path / "s").unet_state()
    committed = torch.load(TRAINED.path, weights_only=True)
    assert trained.keys() == committed.keys() and all(torch.equal(trained[k], committed[k]) for k in committed)

    assert cli.main(["package", "demo", "--random-weights", "--out", str(tmp_path / "r.zip"), "--frames", "4",
                     "--audio-seconds", "0.5"]) == 0
    assert verify_package(tmp_path / "r.zip").model_width == 8
    capsys.readouterr()
    assert cli.main(["package", "demo", "--width", "8", "--out", str(tmp_path / "x.zip")]) == 2
    assert "use those, or ask for random weights (--random-weights)" in capsys.readouterr().err
    assert not (tmp_path / "x.zip").exists()


def test_cli_demo_offline_renders_a_wav_the_user_passes(tmp_path, capsys):
    """``lipsync demo --offline``: straight from the engine, one frame per 40 ms of the file, no pod (the live
    demo's tests are in tests/cli/test_quickstart.py)."""
    from inference_pod import cli

    wav = tmp_path / "mine.wav"
    wav.write_bytes(encode_wav_pcm16(speech_like_audio(0.6, seed=9)))
    out = tmp_path / "out"
    argv = ["demo", "--offline", "--out", str(out), "--frames", "4", "--no-video", "--audio", str(wav)]
    assert cli.main(argv) == 0
    assert len(list((out / "frames").glob("frame_*.png"))) == audio.frame_count(int(0.6 * audio.SAMPLE_RATE))
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(out), "--audio", str(tmp_path / "nope.wav")]) == 2
    assert capsys.readouterr().err.strip() == f"lipsync: error: --audio {tmp_path / 'nope.wav'}: no such file"
