"""SyncTalk_2D dataset conversion: the crop rule, landmark parsing, strict checkpoints, and whole conversions."""

from __future__ import annotations

import wave

import cv2
import numpy as np
import pytest
import soundfile
import soxr
import torch

from inference_pod.core.model import LipSyncUNet, load_strict, random_weights
from inference_pod.errors import CheckpointError, PackageError
from inference_pod.package import extract_package, verify_package
from inference_pod.tools.synctalk_dataset import build_package as convert
from inference_pod.tools.synctalk_dataset import (
    crop_box,
    load_checkpoint,
    read_dataset,
    read_landmarks,
    resolve_mode,
)


def _write_lms(path, points: dict[int, tuple[float, float]], default=(5.0, 5.0)) -> None:
    lines = [points.get(i, default) for i in range(110)]
    path.write_text("".join(f"{x} {y}\n" for x, y in lines))


def _box(tmp_path, points, image_size=(100, 100)):
    path = tmp_path / "0.lms"
    _write_lms(path, points)
    return crop_box(read_landmarks(path), image_size)


# ------------------------------------------------------------------------------------------ crop rule


def test_crop_box_follows_synctalk_2d(tmp_path):
    # x1 = int(lms[1].x), y1 = int(lms[52].y), x2 = int(lms[31].x), y2 = y1 + (x2 - x1)
    assert _box(tmp_path, {1: (10.9, 70.0), 31: (50.2, 71.0), 52: (30.0, 20.7)}) == (10, 20, 50, 60)


def test_crop_box_truncates_toward_zero_not_floor(tmp_path):
    # int32 cast truncates: -0.9 -> 0 (floor would give -1 and a box starting outside the image).
    assert _box(tmp_path, {1: (-0.9, 0.0), 31: (40.99, 0.0), 52: (0.0, -0.5)}) == (0, 0, 40, 40)


def test_crop_box_parses_as_float32(tmp_path):
    # 30.99999999 is 31.0 in float32 (SyncTalk_2D parses with dtype=np.float32), 30 in float64.
    assert _box(tmp_path, {1: (30.99999999, 0.0), 31: (60.0, 0.0), 52: (0.0, 10.0)}) == (31, 10, 60, 39)


def test_crop_box_is_clipped_like_numpy_slicing(tmp_path):
    box = _box(tmp_path, {1: (30.5, 0.0), 31: (60.5, 0.0), 52: (0.0, 40.2)}, image_size=(48, 48))
    assert box == (30, 40, 48, 48)
    image = np.zeros((48, 48, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    assert image[40:70, 30:60].shape[:2] == (y2 - y1, x2 - x1)  # what SyncTalk_2D's img[ymin:ymax, xmin:xmax] gives


@pytest.mark.parametrize(
    "points, message",
    [
        ({1: (40.0, 0.0), 31: (40.7, 0.0), 52: (0.0, 10.0)}, "empty crop box: point 31 x=40 is not right of point 1 x=40"),
        ({1: (50.0, 0.0), 31: (20.0, 0.0), 52: (0.0, 10.0)}, "empty crop box"),
        ({1: (100.0, 0.0), 31: (140.0, 0.0), 52: (0.0, 10.0)}, r"crop box starts at \(100, 10\), outside the 100x100 image"),
        ({1: (10.0, 0.0), 31: (40.0, 0.0), 52: (0.0, -3.5)}, r"crop box starts at \(10, -3\)"),
    ],
)
def test_crop_box_refuses_empty_or_outside_boxes(points, message, tmp_path):
    with pytest.raises(PackageError, match=message):
        _box(tmp_path, points)


@pytest.mark.parametrize(
    "content, message",
    [
        ("1 2\n" * 109, "has 109 points, SyncTalk_2D's landmark files have 110"),
        ("1 2\n" * 4 + "1 2 3\n" + "1 2\n" * 105, "line 5: expected two numbers 'x y', got '1 2 3'"),
        ("1 2\n" * 7 + "1 abc\n" + "1 2\n" * 102, "line 8: '1 abc' is not two numbers"),
        ("1 2\n" * 2 + "nan 2\n" + "1 2\n" * 107, "line 3: coordinate 'nan 2' is not a finite pixel position"),
    ],
)
def test_bad_landmark_files_name_file_and_line(content, message, tmp_path):
    path = tmp_path / "7.lms"
    path.write_text(content)
    with pytest.raises(PackageError, match=f"{path}.* {message}" if "line" in message else message):
        read_landmarks(path)


# ------------------------------------------------------------------------------------------ reading a dataset


def _synctalk_boxes(dataset_dir, count):
    """The crop boxes as SyncTalk_2D's inference_328.py computes them, written out independently."""
    boxes = []
    for i in range(count):
        rows = [np.array(line.split(" "), dtype=np.float32) for line in (dataset_dir / "landmarks" / f"{i}.lms").read_text().splitlines()]
        lms = np.array(rows, dtype=np.int32)
        xmin, ymin, xmax = lms[1][0], lms[52][1], lms[31][0]
        boxes.append([xmin, ymin, xmax, ymin + (xmax - xmin)])
    return np.array(boxes)


def test_read_dataset_matches_synctalk_2d(synctalk_dataset_dir):
    dataset = read_dataset(synctalk_dataset_dir)
    assert dataset.image_size == (64, 64)
    assert [p.name for p in dataset.frame_paths] == [f"{i}.jpg" for i in range(12)]
    expected = _synctalk_boxes(synctalk_dataset_dir, 12)
    expected[:, 2:] = np.minimum(expected[:, 2:], 64)
    assert dataset.crop_boxes.dtype == np.int32
    assert np.array_equal(dataset.crop_boxes, expected)


def test_read_dataset_names_the_missing_or_bad_file(synctalk_dataset_dir):
    (synctalk_dataset_dir / "landmarks" / "3.lms").unlink()
    with pytest.raises(PackageError, match=r"landmarks/3.lms is missing"):
        read_dataset(synctalk_dataset_dir)
    (synctalk_dataset_dir / "full_body_img" / "5.jpg").unlink()
    with pytest.raises(PackageError, match=r"full_body_img/5.jpg is missing \(11 frames found, numbered up to 11\)"):
        read_dataset(synctalk_dataset_dir)


def test_read_dataset_refuses_mixed_frame_sizes(synctalk_dataset_dir):
    cv2.imwrite(str(synctalk_dataset_dir / "full_body_img" / "2.jpg"), np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(PackageError, match="full_body_img/2.jpg is 48x32 but full_body_img/0.jpg is 64x64"):
        read_dataset(synctalk_dataset_dir)


def test_read_dataset_refuses_a_directory_without_frames(tmp_path):
    with pytest.raises(PackageError, match="not a SyncTalk_2D character directory: full_body_img/ is missing"):
        read_dataset(tmp_path)


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("mode", ["ave", "hubert", "wenet"])
def test_strict_checkpoint_loading_for_every_mode(mode, tmp_path):
    source = random_weights(LipSyncUNet(mode, 4), 5)
    path = tmp_path / "unet.pth"
    torch.save(source.state_dict(), path)  # what SyncTalk_2D's train_328.py writes
    state = load_checkpoint(path, "U-Net")
    assert "inc.inconv.0.conv.0.weight" in state and "audio_model.conv3.weight" in state
    assert resolve_mode(state, None, "ckpt") == ("wenet" if mode == "wenet" else "ave", 4)
    assert resolve_mode(state, mode, "ckpt") == (mode, 4)
    fresh = LipSyncUNet(mode, 4)
    load_strict(fresh, state, "U-Net")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in source.state_dict().items())

    missing = dict(state)
    missing.pop("audio_model.conv3.bias")
    with pytest.raises(CheckpointError, match="missing keys: audio_model.conv3.bias"):
        load_strict(LipSyncUNet(mode, 4), missing, "U-Net")
    with pytest.raises(CheckpointError, match="unexpected keys: audio_model.conv8.weight"):
        load_strict(LipSyncUNet(mode, 4), {**state, "audio_model.conv8.weight": torch.zeros(1)}, "U-Net")
    wrong = {**state, "outc.conv.weight": torch.zeros(3, 5, 1, 1)}
    with pytest.raises(CheckpointError, match=r"wrong shapes: outc.conv.weight: checkpoint \(3, 5, 1, 1\)"):
        load_strict(LipSyncUNet(mode, 4), wrong, "U-Net")


def test_mode_must_agree_with_the_checkpoint(tmp_path):
    state = random_weights(LipSyncUNet("wenet", 4), 0).state_dict()
    with pytest.raises(CheckpointError, match="ckpt is a wenet U-Net, not ave"):
        resolve_mode(state, "ave", "ckpt")
    ave_state = random_weights(LipSyncUNet("ave", 4), 0).state_dict()
    with pytest.raises(CheckpointError, match="ckpt is an ave/hubert U-Net, not wenet"):
        resolve_mode(ave_state, "wenet", "ckpt")


def test_unloadable_checkpoints_are_refused(tmp_path):
    with pytest.raises(PackageError, match="U-Net checkpoint .*missing.pth does not exist"):
        load_checkpoint(tmp_path / "missing.pth", "U-Net")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth cannot be loaded"):
        load_checkpoint(junk, "U-Net")


# ------------------------------------------------------------------------------------------ conversion


def _prefixed(path, out, prefix):
    state = torch.load(path, weights_only=True)
    torch.save({f"{prefix}{k}": v for k, v in state.items()}, out)
    return out


def test_convert_with_dataparallel_checkpoints(synctalk_dataset_dir, demo_checkpoints, tmp_path):
    unet, encoder = demo_checkpoints
    unet_dp = _prefixed(unet, tmp_path / "unet_dp.pth", "module.")
    encoder_dp = _prefixed(encoder, tmp_path / "ave_dp.pth", "module.")
    manifest = convert(synctalk_dataset_dir, unet_dp, encoder_dp, "may", tmp_path / "may.zip", version="5")
    assert (manifest.name, manifest.version, manifest.audio_mode, manifest.fps, manifest.model_width) == ("may", "5", "ave", 25, 4)
    assert (manifest.frame_count, manifest.image_size, manifest.has_default_audio) == (12, (64, 64), True)

    package = extract_package(tmp_path / "may.zip", tmp_path / "may")
    for i in range(12):
        assert package.frame_bytes(i) == (synctalk_dataset_dir / "full_body_img" / f"{i}.jpg").read_bytes()
    expected_boxes = _synctalk_boxes(synctalk_dataset_dir, 12)
    expected_boxes[:, 2:] = np.minimum(expected_boxes[:, 2:], 64)
    assert np.array_equal(package.crop_boxes(), expected_boxes)
    for got, source in ((package.unet_state(), unet), (package.audio_encoder_state(), encoder)):
        original = torch.load(source, weights_only=True)
        assert list(got) == list(original)  # prefix removed, SyncTalk_2D's key order kept
        assert all(torch.equal(got[k], original[k]) for k in original)
    assert np.array_equal(package.default_features(), np.load(synctalk_dataset_dir / "aud_ave.npy"))
    with wave.open(str(package.default_audio_path())) as got, wave.open(str(synctalk_dataset_dir / "aud.wav")) as src:
        assert (got.getframerate(), got.getnchannels(), got.getsampwidth()) == (16000, 1, 2)
        assert got.readframes(got.getnframes()) == src.readframes(src.getnframes())  # PCM16 16 kHz kept exactly


def test_convert_resamples_audio_and_computes_missing_features(synctalk_dataset_dir, demo_checkpoints, tmp_path):
    unet, encoder = demo_checkpoints
    original_features = np.load(synctalk_dataset_dir / "aud_ave.npy")
    samples, _ = soundfile.read(synctalk_dataset_dir / "aud.wav", dtype="float32")
    # The same track at 44.1 kHz stereo, and no precomputed features.
    resampled = soxr.resample(samples, 16000, 44100, quality="HQ")
    soundfile.write(synctalk_dataset_dir / "aud.wav", np.stack([resampled, resampled], axis=1), 44100, subtype="PCM_24")
    (synctalk_dataset_dir / "aud_ave.npy").unlink()
    manifest = convert(synctalk_dataset_dir, unet, encoder, "may", tmp_path / "may.zip")
    package = extract_package(tmp_path / "may.zip", tmp_path / "may")
    with wave.open(str(package.default_audio_path())) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert abs(wav.getnframes() - samples.size) <= 2
    features = package.default_features()
    assert manifest.has_default_audio and features.shape == original_features.shape
    # Computed with the same encoder from (nearly) the same samples: close to SyncTalk_2D-style aud_ave.npy.
    corr = np.corrcoef(features.ravel(), original_features.ravel())[0, 1]
    assert corr > 0.99


def test_convert_hubert_takes_aud_hu_and_needs_no_encoder(synctalk_dataset_dir, tmp_path):
    unet = tmp_path / "hubert.pth"
    torch.save(random_weights(LipSyncUNet("hubert", 4), 1).state_dict(), unet)
    hubert = np.random.default_rng(0).standard_normal((30, 2, 1024)).astype(np.float32)  # SyncTalk_2D's aud_hu.npy
    np.save(synctalk_dataset_dir / "aud_hu.npy", hubert)
    manifest = convert(synctalk_dataset_dir, unet, None, "hu", tmp_path / "hu.zip", mode="hubert")
    assert (manifest.audio_mode, manifest.fps) == ("hubert", 25)
    package = extract_package(tmp_path / "hu.zip", tmp_path / "hu")
    assert package.audio_encoder_state() is None
    assert np.array_equal(package.default_features(), hubert.reshape(30, 2048))
    verify_package(tmp_path / "hu.zip")


def test_convert_wenet_is_detected_from_the_checkpoint(synctalk_dataset_dir, tmp_path):
    unet = tmp_path / "wenet.pth"
    torch.save(random_weights(LipSyncUNet("wenet", 4), 1).state_dict(), unet)
    manifest = convert(synctalk_dataset_dir, unet, None, "we", tmp_path / "we.zip")
    # No aud_wenet.npy: no default track, and the ave-only aud.wav is left out.
    assert (manifest.audio_mode, manifest.fps, manifest.has_default_audio) == ("wenet", 20, False)


def test_convert_refuses_bad_inputs(synctalk_dataset_dir, demo_checkpoints, tmp_path):
    unet, encoder = demo_checkpoints
    with pytest.raises(PackageError, match="ave mode needs the AVE audio encoder"):
        convert(synctalk_dataset_dir, unet, None, "x", tmp_path / "x.zip")
    with pytest.raises(PackageError, match="package name 'Bad_Name' is not valid"):
        convert(synctalk_dataset_dir, unet, encoder, "Bad_Name", tmp_path / "x.zip")
    with pytest.raises(PackageError, match="package version 'v 2' is not valid"):
        convert(synctalk_dataset_dir, unet, encoder, "x", tmp_path / "x.zip", version="v 2")
    np.save(synctalk_dataset_dir / "aud_ave.npy", np.zeros((10, 256), np.float32))
    with pytest.raises(PackageError, match=r"aud_ave.npy has shape \(10, 256\), expected \(T, 512\) for ave mode"):
        convert(synctalk_dataset_dir, unet, encoder, "x", tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()
