"""`lipsync render` on a character in SyncTalk_2D's format reproduces SyncTalk_2D's own inference.

The reference side is built the way SyncTalk_2D builds it, independently of inference_pod.core.audio and
inference_pod.core.engine: librosa loads and analyses the wav, the AVE checkpoint is loaded under the
``audio_encoder.`` prefix, windows are cut by SyncTalk_2D's AudDataset rule, and frames come from the
per-frame loop reading JPEGs and landmark files from disk.
"""

from __future__ import annotations

import io
import json
import subprocess
import zipfile

import cv2
import librosa
import numpy as np
import pytest
import torch
from scipy import signal
from torch import nn

from inference_pod.bench import naive
from inference_pod.cli import main
from inference_pod.core.model import AveAudioEncoder
from inference_pod.tools.synctalk_dataset import build_package


def synctalk_features(wav_path, encoder_ckpt) -> np.ndarray:
    wav = librosa.load(wav_path, sr=16000)[0]
    d = librosa.stft(y=signal.lfilter([1, -0.97], [1], wav), n_fft=800, hop_length=200, win_length=800)
    s = 20 * np.log10(np.maximum(1e-5, librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ np.abs(d))) - 20
    mel = np.clip(8 * ((s + 100) / 100) - 4, -4, 4).T
    count = int((mel.shape[0] - 16) / 80.0 * 25.0) + 2
    windows = []
    for idx in range(count):
        start = int(80.0 * (idx / 25.0))
        end = start + 16
        if end > mel.shape[0]:
            end = mel.shape[0]
            start = end - 16
        windows.append(mel[start:end].T[None])

    class AudioEncoder(nn.Module):  # SyncTalk_2D's wrapper: the Sequential lives under .audio_encoder
        def __init__(self):
            super().__init__()
            self.audio_encoder = AveAudioEncoder()

        def forward(self, x):
            return self.audio_encoder(x)

    model = AudioEncoder().eval()
    ckpt = torch.load(encoder_ckpt, weights_only=True)
    model.load_state_dict({f"audio_encoder.{k}": v for k, v in ckpt.items()})
    with torch.no_grad():
        out = model(torch.from_numpy(np.stack(windows)).float()).numpy()
    return np.concatenate([out[:1], out, out[-1:]])


@pytest.fixture
def converted(synctalk_dataset_dir, demo_checkpoints, tmp_path):
    unet, encoder = demo_checkpoints
    pkg = tmp_path / "demo.zip"
    build_package(synctalk_dataset_dir, unet, encoder, "demo", pkg)
    return pkg


def test_render_reproduces_synctalk_frame_for_frame(converted, synctalk_dataset_dir, demo_checkpoints, tmp_path):
    unet_ckpt, encoder_ckpt = demo_checkpoints
    wav = synctalk_dataset_dir / "aud.wav"
    out = tmp_path / "frames"
    assert main(["render", str(converted), "--audio", str(wav), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", "--batch-size", "5", "--no-progress"]) == 0

    features = synctalk_features(wav, encoder_ckpt)
    net = naive.load_network(torch.load(unet_ckpt, weights_only=True), "ave", 4, "cpu")
    reference = list(naive.run_loop(synctalk_dataset_dir, net, features))
    rendered = sorted(out.glob("*.png"))
    assert len(rendered) == len(reference) == len(features)  # as many frames as SyncTalk_2D makes
    worst = 0
    for path, ref in zip(rendered, reference, strict=True):
        ours = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert ours.shape == ref.shape
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert (diff <= 2).mean() >= 0.999, f"{path.name}: {(diff > 2).sum()} pixels off by more than 2"
        worst = max(worst, int(diff.max()))
    assert worst <= 8


def test_render_video_has_frames_and_audio(converted, synctalk_dataset_dir, tmp_path):
    video = tmp_path / "out.mp4"
    wav = synctalk_dataset_dir / "aud.wav"
    assert main(["render", str(converted), "--audio", str(wav), "--out", str(tmp_path / "f"), "--video", str(video),
                 "--no-progress"]) == 0
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(video)],
                           capture_output=True, check=True, text=True)
    streams = {s["codec_type"]: s for s in json.loads(probe.stdout)["streams"]}
    assert set(streams) == {"video", "audio"}
    assert int(streams["video"]["nb_frames"]) == len(list((tmp_path / "f").glob("*.png")))


def test_render_default_track_without_audio(converted, synctalk_dataset_dir, tmp_path):
    """Without --audio, the package's default track: the dataset's aud_ave.npy (packaged as
    audio/default_features.npy) padded with its first and last row, as SyncTalk_2D's inference pads it
    (``synctalk_features`` above), so one frame per row plus two, numbered from 0."""
    assert main(["render", str(converted), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    with zipfile.ZipFile(converted) as zf:
        packaged = np.load(io.BytesIO(zf.read("audio/default_features.npy")))
    rows = len(np.load(synctalk_dataset_dir / "aud_ave.npy"))
    assert len(packaged) == rows
    track_frames = 1 + rows + 1
    rendered = sorted(p.name for p in (tmp_path / "f").glob("*.png"))
    assert rendered == sorted(f"frame_{i:06d}.png" for i in range(track_frames))


def test_render_rejects_unreadable_audio(converted, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEnot really")
    assert main(["render", str(converted), "--audio", str(bad), "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert f"cannot decode {bad}: it is not audio" in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_leaves_the_warm_up_batch_out_of_the_rate():
    from inference_pod.tools.render import RenderProgress

    clock = FakeClock()
    progress = RenderProgress(total=1000, warmup_frames=16, clock=clock)
    assert progress.describe() == "warming up" and progress.seconds_left() is None
    clock.now = 30.0  # the first batch pays the warm-up: 30 s for 16 frames
    progress.update(16)
    assert progress.rate() is None and progress.describe() == "measuring"
    for i in range(1, 85):  # then 16 frames a second
        clock.now = 30.0 + i / 16
        progress.update(1)
    assert progress.rate() == pytest.approx(16.0)
    assert progress.seconds_left() == pytest.approx(900 / 16.0)  # not 900 frames at 100 frames per 35.25 s
    assert progress.describe() == "16.0 frame/s, 00:56 left"


def test_progress_rate_evens_out_frames_that_finish_in_bursts():
    from inference_pod.tools.render import RenderProgress

    clock = FakeClock()
    progress = RenderProgress(total=64, warmup_frames=8, clock=clock)
    clock.now = 5.0
    progress.update(8)
    for batch in range(1, 4):  # a batch of 8 every 2 s, its frames drained at once
        clock.now = 5.0 + 2.0 * batch
        for _ in range(8):
            progress.update(1)
    assert progress.rate() == pytest.approx(4.0) and progress.seconds_left() == pytest.approx(32 / 4.0)


def test_render_progress_bar_shows_the_rate_after_warm_up(demo_package, tmp_path, capsys, one_torch_thread):
    assert main(["render", str(demo_package), "--out", str(tmp_path / "f"), "--batch-size", "4",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    bar = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]
    assert "100%" in bar and "frame/s" in bar and "left" in bar, bar
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())  # files: the zip's stamp
    unpacked = [name for name in folders if not name.endswith(".templates")]  # beside it: its prepared templates
    assert [name.startswith("demo-1-") for name in unpacked] == [True], folders  # --cache-dir
    assert folders == [f".{unpacked[0]}.templates", unpacked[0]], folders


def test_render_paste_feather_writes_the_engines_feathered_frames(demo_package, tmp_path, one_torch_thread):
    """``--paste feather`` renders what a feathered engine composites; without it, the exact paste."""
    from inference_pod.core.engine import Engine
    from inference_pod.package import open_package

    for paste in ("exact", "feather"):
        flags = [] if paste == "exact" else ["--paste", paste]
        assert main(["render", str(demo_package), "--out", str(tmp_path / paste), "--no-progress",
                     "--cache-dir", str(tmp_path / "cache"), *flags]) == 0
    engine = Engine.from_package(open_package(demo_package, cache_dir=tmp_path / "cache"), paste="feather")
    ids = [0, 7, 20]
    templates = [engine.template_index(i) for i in ids]
    predictions = engine.predict(templates, engine.windows(engine.default_features, ids))
    for i, template, prediction in zip(ids, templates, predictions, strict=True):
        feathered = cv2.imread(str(tmp_path / "feather" / f"frame_{i:06d}.png"))
        assert np.array_equal(feathered, engine.composite(template, prediction))
        assert not np.array_equal(feathered, cv2.imread(str(tmp_path / "exact" / f"frame_{i:06d}.png")))


def test_render_refuses_an_unknown_paste(demo_package, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["render", str(demo_package), "--out", str(tmp_path / "f"), "--paste", "soft"])
    assert exit_.value.code == 2 and "argument --paste: invalid choice: 'soft'" in capsys.readouterr().err
