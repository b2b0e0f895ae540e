"""`lipsync train`: SyncTalk_2D's reconstruction objective on a package's own frames, deterministic and resumable."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_pod.errors import InvalidInput, PackageError
from inference_pod.package import open_package, verify_package
from inference_pod.tools.demo_character import build_demo_package
from inference_pod.tools.train import TrainConfig, TrainingSet, next_version, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TrainConfig(steps=2, batch_size=2, learning_rate=2e-3, seed=5, threads=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> Path:
    """Width 4, 6 frames of 48x48 whose mouths follow a 1 s synthetic voice track, version 3."""
    out = tmp_path_factory.mktemp("train-src") / "tiny.zip"
    build_demo_package("tiny", out, width=4, frames=6, seed=1, size=(48, 48), audio_seconds=1.0, version="3")
    return out


def _unet(path: Path, cache: Path) -> dict[str, torch.Tensor]:
    return open_package(path, cache_dir=cache).unet_state()


def test_training_writes_a_new_version_that_differs_only_in_weights(tiny_package, tmp_path):
    result = train(tiny_package, tmp_path / "out.zip", TINY, progress=False)
    before, after = open_package(tiny_package, cache_dir=tmp_path / "a"), open_package(result.package, cache_dir=tmp_path / "b")
    assert verify_package(result.package).version == "4"  # 3 -> 4
    old, new = before.manifest, after.manifest
    assert (new.name, new.audio_mode, new.model_width, new.frame_count, new.fps) == (
        old.name, old.audio_mode, old.model_width, old.frame_count, old.fps)
    for member in old.members:
        if member != "weights/unet.pth":
            assert new.members[member] == old.members[member], member  # frames, boxes, encoder, track unchanged
    changed = [k for k, v in before.unet_state().items() if not torch.equal(v, after.unet_state()[k])]
    assert "inc.inconv.0.conv.0.weight" in changed and "audio_model.conv1.conv.0.weight" in changed
    assert np.isfinite(result.first_loss) and np.isfinite(result.last_loss)
    assert sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir()) == ["step-000001.pt", "step-000002.pt"]
    assert {p.name for p in tmp_path.iterdir()} == {"out.zip", "out.checkpoints", "a", "b"}  # nothing else left behind


def test_same_seed_same_bits_and_resume_equals_uninterrupted(tiny_package, tmp_path):
    # Same file name in different folders: torch.save records the name, and the committed file keeps its own.
    straight = train(tiny_package, tmp_path / "a.zip", TINY, progress=False, export_unet=tmp_path / "a" / "unet.pth")
    again = train(tiny_package, tmp_path / "b.zip", TINY, progress=False, export_unet=tmp_path / "b" / "unet.pth")
    assert (tmp_path / "a" / "unet.pth").read_bytes() == (tmp_path / "b" / "unet.pth").read_bytes()
    assert straight.last_loss == again.last_loss

    resumed = train(tiny_package, tmp_path / "c.zip", TINY, progress=False, export_unet=tmp_path / "c" / "unet.pth",
                    resume=tmp_path / "a.checkpoints" / "step-000001.pt")
    assert (tmp_path / "c" / "unet.pth").read_bytes() == (tmp_path / "a" / "unet.pth").read_bytes()
    assert resumed.steps == 2

    other_seed = replace(TINY, seed=6)
    train(tiny_package, tmp_path / "d.zip", other_seed, progress=False, export_unet=tmp_path / "d" / "unet.pth")
    assert (tmp_path / "d" / "unet.pth").read_bytes() != (tmp_path / "a" / "unet.pth").read_bytes()


def test_training_pairs_each_frame_with_its_own_audio_and_a_different_reference(tiny_package, tmp_path):
    package = open_package(tiny_package, cache_dir=tmp_path / "store")
    data = TrainingSet(package)
    assert data.count == 6 and data.crops.shape == (6, 3, 320, 320) and data.crops.dtype == torch.uint8
    image, audio_windows, target = data.batch(seed=0, step=0, size=64)
    assert image.shape == (64, 6, 320, 320) and audio_windows.shape == (64, 32, 16, 16)
    # Channels 3-5 are the target with all but the border blanked; channels 0-2 another frame.
    assert torch.equal(image[:, 3:, 10:300, 10:300], torch.zeros_like(image[:, 3:, 10:300, 10:300]))
    assert torch.equal(image[:, 3:, :5], target[:, :, :5])
    assert not any(torch.equal(image[k, :3], target[k]) for k in range(64))
    # Each target's audio is the window the engine would give that frame.
    targets = [next(i for i in range(6) if torch.equal(data.crops[i].float() / 255, target[k])) for k in range(64)]
    assert all(torch.equal(audio_windows[k], data.audio[t]) for k, t in enumerate(targets))
    assert len(set(targets)) > 3
    again = data.batch(seed=0, step=0, size=64)
    assert all(torch.equal(a, b) for a, b in zip((image, audio_windows, target), again, strict=True))


def test_bad_requests_are_refused(tiny_package, tmp_path):
    with pytest.raises(InvalidInput, match="--steps must be >= 1"):
        train(tiny_package, tmp_path / "x.zip", TrainConfig(steps=0), progress=False)
    with pytest.raises(InvalidInput, match="does not exist"):
        train(tiny_package, tmp_path / "x.zip", TINY, progress=False, resume=tmp_path / "nope.pt")
    train(tiny_package, tmp_path / "a.zip", TINY, progress=False)
    other = replace(TINY, learning_rate=1e-3)
    with pytest.raises(InvalidInput, match="--learning-rate 0.002, not 0.001"):
        train(tiny_package, tmp_path / "x.zip", other, progress=False, resume=tmp_path / "a.checkpoints" / "step-000001.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="cannot be loaded"):
        train(tiny_package, tmp_path / "x.zip", TINY, progress=False, resume=tmp_path / "junk.pt")
    assert not (tmp_path / "x.zip").exists()


def test_a_package_without_a_default_track_cannot_be_trained(tmp_path, demo_character_package):
    from inference_pod.package import write_package

    src = demo_character_package
    m = src.manifest
    write_package(
        tmp_path / "silent.zip", name="silent", version="1", audio_mode=m.audio_mode, model_width=m.model_width,
        fps=m.fps, frames=[src.frame_bytes(i) for i in range(m.frame_count)], frame_ext=m.frame_ext,
        crop_boxes=src.crop_boxes(), unet_state=src.unet_state(), audio_encoder_state=src.audio_encoder_state(),
    )  # fmt: skip
    with pytest.raises(PackageError, match="has no default track"):
        train(tmp_path / "silent.zip", tmp_path / "x.zip", TINY, progress=False)


def test_next_version():
    assert [next_version(v) for v in ("1", "41", "beta", "2.0")] == ["2", "42", "beta-trained", "2.0-trained"]


def test_cli_trains_and_reports_mistakes_in_one_line(tiny_package, tmp_path):
    env_cmd = [sys.executable, "-m", "inference_pod.cli", "train", str(tiny_package), "--out", str(tmp_path / "t.zip"),
               "--steps", "1", "--batch-size", "1", "--threads", "1", "--device", "cpu", "--no-progress",
               "--export-unet", str(tmp_path / "u.pth")]
    done = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trained 1 steps on cpu" in done.stdout and (tmp_path / "u.pth").is_file()
    assert verify_package(tmp_path / "t.zip").version == "4"

    bad = subprocess.run(env_cmd[:5] + ["--out", str(tmp_path / "v.zip"), "--steps", "0"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "lipsync: error: --steps must be >= 1, got 0"
