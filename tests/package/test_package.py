"""The package format: round trip, verification, every refusal, atomic extraction, and the CLI."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import stat
import struct
import subprocess
import sys
import warnings
import wave
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference_pod import cli
from inference_pod.core.model import AveAudioEncoder, LipSyncUNet, random_weights
from inference_pod.errors import CheckpointError, InvalidInput, PackageError
from inference_pod.package import (
    AUDIO_ENCODER,
    CROP_BOXES,
    DEFAULT_AUDIO,
    DEFAULT_FEATURES,
    FORMAT_VERSION,
    MANIFEST,
    UNET,
    Manifest,
    PackageLimits,
    check_extracted_source,
    extract_package,
    open_package,
    read_manifest,
    verify_package,
    write_package,
)

W, H = 48, 40


def _frame(i: int, size=(W, H), ext="jpg") -> bytes:
    img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    cv2.circle(img, (10 + 3 * i, 20), 8, (40 * i % 255, 200, 90), -1)
    ok, data = cv2.imencode(f".{ext}", img)
    assert ok
    return data.tobytes()


def _wav(rate=16000, channels=1, seconds=0.5) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.arange(int(rate * seconds) * channels, dtype="<i2").tobytes())
    return buf.getvalue()


@functools.cache
def _unet_state(mode="ave", width=4) -> dict:
    return random_weights(LipSyncUNet(mode, width), 1).state_dict()


@functools.cache
def _encoder_state() -> dict:
    return random_weights(AveAudioEncoder(), 2).state_dict()


def _inputs(mode="ave", width=4, frames=4, ext="jpg") -> dict:
    gen = np.random.default_rng(0)
    dim = {"ave": 512, "hubert": 2048, "wenet": 8192}[mode]
    return dict(
        name="alice",
        version="2.0-rc1",
        audio_mode=mode,
        model_width=width,
        fps=20 if mode == "wenet" else 25,
        frames=[_frame(i, ext=ext) for i in range(frames)],
        frame_ext=ext,
        crop_boxes=np.array([[2 + i, 3, 40, 38] for i in range(frames)], dtype=np.int32),
        unet_state=_unet_state(mode, width),
        audio_encoder_state=_encoder_state() if mode == "ave" else None,
        default_features=gen.standard_normal((7, dim)).astype(np.float32),
        default_audio=_wav(),
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    inputs = _inputs()
    path = tmp_path_factory.mktemp("written") / "alice.zip"
    manifest = write_package(path, **inputs)
    return path, inputs, manifest


@pytest.fixture(scope="module")
def demo_members(demo_package) -> dict[str, bytes]:
    with zipfile.ZipFile(demo_package) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _listing(directory: Path) -> list[str]:
    """What a directory holds, less the stamps that extraction leaves beside each copy on purpose
    (``.{copy}.source``: the zip it came from, as it was then; ``.{copy}.checked``: the members that passed the
    structural checks); anything partial or temporary still shows."""
    return sorted(p.name for p in directory.iterdir()
                  if not (p.name.startswith(".") and p.name.endswith((".source", ".checked"))))


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_reads_back_every_field_byte_exact(written, tmp_path):
    path, inputs, manifest = written
    package = extract_package(path, tmp_path / "alice")
    m = package.manifest
    assert m == manifest == read_manifest(path)
    assert (m.name, m.version, m.audio_mode, m.model_width, m.fps) == ("alice", "2.0-rc1", "ave", 4, 25)
    assert (m.frame_count, m.image_size, m.frame_ext, m.has_default_audio) == (4, (W, H), "jpg", True)
    assert m.format_version == FORMAT_VERSION == 1
    for i, data in enumerate(inputs["frames"]):
        assert package.frame_bytes(i) == data
        assert m.members[m.frame_member(i)] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    boxes = package.crop_boxes()
    assert boxes.dtype == np.int32 and np.array_equal(boxes, inputs["crop_boxes"])
    for got, expected in ((package.unet_state(), inputs["unet_state"]), (package.audio_encoder_state(), inputs["audio_encoder_state"])):
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    features = package.default_features()
    assert features.dtype == np.float32 and np.array_equal(features, inputs["default_features"])
    assert package.default_audio_path().read_bytes() == inputs["default_audio"]
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert names[0] == MANIFEST
    assert set(names) == {MANIFEST, UNET, AUDIO_ENCODER, CROP_BOXES, DEFAULT_FEATURES, DEFAULT_AUDIO} | {
        f"frames/{i:06d}.jpg" for i in range(4)
    }
    # The weights are plain SyncTalk_2D state_dicts, readable without this project.
    raw = torch.load(package.member_path(UNET), weights_only=True)
    assert "inc.inconv.0.conv.0.weight" in raw
    assert "0.conv_block.0.weight" in torch.load(package.member_path(AUDIO_ENCODER), weights_only=True)


def test_png_frames_and_wenet_without_encoder_or_default_audio(tmp_path):
    inputs = _inputs(mode="wenet", frames=3, ext="png")
    inputs.update(default_features=None, default_audio=None)
    manifest = write_package(tmp_path / "w.zip", **inputs)
    package = extract_package(tmp_path / "w.zip", tmp_path / "w")
    assert manifest.frame_ext == "png" and manifest.fps == 20 and not manifest.has_default_audio
    assert package.audio_encoder_state() is None and package.default_features() is None
    assert package.default_audio_path() is None
    assert package.frame_bytes(2) == inputs["frames"][2]


def test_write_is_reproducible_with_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    inputs = _inputs(frames=2)
    first = write_package(tmp_path / "a.zip", **inputs)
    write_package(tmp_path / "b.zip", **inputs)
    assert first.created == "2023-11-14T22:13:20Z"
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_open_package_zip_uses_cache_and_directories_open_directly(written, tmp_path):
    path, inputs, manifest = written
    first = open_package(path, cache_dir=tmp_path / "cache")
    again = open_package(path, cache_dir=tmp_path / "cache")
    assert first.root == again.root and first.root.parent == tmp_path / "cache"
    assert len(_listing(tmp_path / "cache")) == 1
    direct = open_package(first.root)
    assert direct.manifest == manifest and direct.frame_bytes(1) == inputs["frames"][1]
    with pytest.raises(InvalidInput, match="template frame 4 is out of range 0..3"):
        direct.frame_bytes(4)
    assert direct.frame_bytes(np.int64(0)) == inputs["frames"][0]


def _read_calls() -> int:
    """This process's read system calls so far (``/proc/self/io``): what opening a package really touched."""
    io_counts = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io_counts["syscr"])


def test_a_checked_directory_reopens_without_reading_its_frames_until_one_changes(tmp_path):
    frames = 300
    inputs = {**_inputs(frames=frames), "crop_boxes": np.tile([[2, 3, 40, 38]], (frames, 1)).astype(np.int32)}
    write_package(tmp_path / "many.zip", **inputs)
    root = extract_package(tmp_path / "many.zip", tmp_path / "store" / "many").root
    before = _read_calls()
    open_package(root)  # extraction left the proof that every member passed
    assert _read_calls() - before < frames / 10

    frame = root / "frames/000007.jpg"
    frame.write_bytes(frame.read_bytes())  # same bytes, rewritten: no longer the file that was checked
    before = _read_calls()
    open_package(root)
    assert _read_calls() - before >= frames

    small = _frame(7, size=(W // 2, H // 2))
    padded = small + b"\0" * (frame.stat().st_size - len(small))  # the checked size, other dimensions
    frame.write_bytes(padded)
    with pytest.raises(PackageError, match=f"frames/000007.jpg is {W // 2}x{H // 2}, the manifest says {W}x{H}"):
        open_package(root)
    frame.unlink()
    with pytest.raises(PackageError, match="missing member frames/000007.jpg"):
        open_package(root)


def test_verify_checks_zip_and_directory(written, tmp_path):
    path, _, manifest = written
    assert verify_package(path) == manifest
    root = extract_package(path, tmp_path / "x").root
    assert verify_package(root) == manifest
    frame = root / manifest.frame_member(1)
    data = bytearray(frame.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes: only the hash notices
    frame.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256 mismatch for frames/000001.jpg"):
        verify_package(root)
    (root / "stray.txt").write_text("x")
    with pytest.raises(PackageError, match="unlisted file stray.txt"):
        verify_package(root)


def test_verify_decodes_frames(demo_members, tmp_path):
    # A JPEG header with nothing decodable behind it passes the header check but not a full decode.
    good = demo_members["frames/000001.jpg"]
    sof = good.index(b"\xff\xc0")
    broken = good[: sof + 19] + b"\xff\xd9"
    inputs = _inputs(frames=2)
    inputs["frames"][1] = _frame(1)[: _frame(1).index(b"\xff\xc0") + 19] + b"\xff\xd9"
    with pytest.raises(PackageError, match="frame 1 does not decode"):  # a build decodes every frame
        write_package(tmp_path / "w.zip", **inputs)
    _repack(demo_members, tmp_path / "p.zip", replace={"frames/000001.jpg": broken})  # made by another tool
    extract_package(tmp_path / "p.zip", tmp_path / "p")  # structure is fine
    with pytest.raises(PackageError, match="frames/000001.jpg does not decode"):
        verify_package(tmp_path / "p.zip")


def test_extracting_the_same_package_again_is_reused(written, tmp_path):
    path, _, manifest = written
    dest = tmp_path / "pkg"
    extract_package(path, dest)
    frame = dest / manifest.frame_member(0)
    inode = frame.stat().st_ino
    extract_package(path, dest)
    assert frame.stat().st_ino == inode  # not rewritten
    frame.write_bytes(b"short")  # damaged: the next extraction replaces it
    extract_package(path, dest)
    assert frame.read_bytes() == _inputs()["frames"][0]
    assert _listing(tmp_path) == ["pkg"]


def test_extracting_a_different_package_replaces_the_old_one(written, tmp_path):
    path, _, _ = written
    dest = tmp_path / "pkg"
    extract_package(path, dest)
    other = _inputs(frames=2)
    other["version"] = "3"
    write_package(tmp_path / "other.zip", **other)
    package = extract_package(tmp_path / "other.zip", dest)
    assert package.manifest.version == "3" and package.manifest.frame_count == 2
    assert not (dest / "frames/000003.jpg").exists()
    assert _listing(tmp_path) == ["other.zip", "pkg"]


def test_failed_extraction_keeps_the_installed_package(written, demo_members, tmp_path):
    path, _, manifest = written
    dest = tmp_path / "out" / "pkg"
    extract_package(path, dest)
    bad = tmp_path / "bad.zip"
    _repack(demo_members, bad, replace={"frames/000002.jpg": _frame(0, size=(64, 64))}, rehash=False)
    with pytest.raises(PackageError):
        extract_package(bad, dest)
    assert read_manifest(dest) == manifest
    assert _listing(tmp_path / "out") == ["pkg"]


# ------------------------------------------------------------------------------------------ write refusals


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "Alice Smith"}, "package name 'Alice Smith' is not valid"),
        ({"version": "../1"}, "package version '../1' is not valid"),
        ({"audio_mode": "mfcc"}, "audio mode 'mfcc'"),
        ({"fps": 30}, "fps 30 does not match audio_mode 'ave'"),
        ({"fps": 25.9}, "fps must be a positive integer, got 25.9"),
        ({"frames": []}, "at least one template frame"),
        ({"frame_ext": "gif"}, "frame extension 'gif'"),
        ({"crop_boxes": np.zeros((3, 4), np.int32)}, r"crop boxes have shape \(3, 4\), expected \(4, 4\)"),
        ({"crop_boxes": np.full((4, 4), 1.5)}, "crop boxes must be integers"),
        ({"audio_encoder_state": None}, "ave mode needs the audio encoder"),
        ({"model_width": 8}, "U-Net checkpoint does not fit"),
        ({"model_width": 3}, "model width must be an even number >= 2, got 3"),
        ({"default_features": np.zeros((5, 511), np.float32)}, r"default features have shape \(5, 511\)"),
        ({"default_features": None}, "wav needs its features"),
        ({"default_audio": _wav(rate=22050)}, "must be 16000 Hz mono 16-bit PCM"),
    ],
)
def test_write_refuses_bad_inputs(change, message, tmp_path):
    inputs = _inputs()
    inputs.update(change)
    with pytest.raises(PackageError, match=message):
        write_package(tmp_path / "p.zip", **inputs)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_frames_of_different_sizes(tmp_path):
    inputs = _inputs()
    inputs["frames"][2] = _frame(2, size=(W + 2, H))
    with pytest.raises(PackageError, match=f"frame 2 is {W + 2}x{H} but frame 0 is {W}x{H}"):
        write_package(tmp_path / "p.zip", **inputs)


def test_write_refuses_truncated_or_undecodable_frames(tmp_path):
    inputs = _inputs()
    inputs["frames"][1] = inputs["frames"][1][: len(inputs["frames"][1]) // 2]
    with pytest.raises(PackageError, match="frame 1 is truncated"):
        write_package(tmp_path / "p.zip", **inputs)
    inputs = _inputs(ext="png")
    inputs["frames"][3] = inputs["frames"][3][:-12]
    with pytest.raises(PackageError, match="frame 3 is truncated"):
        write_package(tmp_path / "p.zip", **inputs)


def test_extraction_never_replaces_a_directory_it_did_not_make(written, tmp_path):
    zip_path = written[0]
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "important.txt").write_text("keep me")
    with pytest.raises(PackageError, match="not an extracted package; refusing to replace it"):
        extract_package(zip_path, dest)
    assert (dest / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


# ------------------------------------------------------------------------------------------ bad packages


def _repack(members: dict[str, bytes], out: Path, *, drop=(), replace=None, add=None, edit=None, rehash=True, raw_manifest=None):
    """Rewrite a package's members (and, with ``rehash``, the manifest's checksums of changed ones)."""
    members = {k: v for k, v in members.items() if k not in drop}
    members.update(replace or {})
    manifest = json.loads(members[MANIFEST]) if MANIFEST in members else None
    if manifest is not None:
        if rehash:
            for name in (replace or {}):
                if name in manifest["members"]:
                    data = members[name]
                    manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if edit:
            edit(manifest)
        members[MANIFEST] = raw_manifest if raw_manifest is not None else json.dumps(manifest).encode()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are written on purpose in one case
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in add or ():
            zf.writestr(info, data)
    return out


def _state_bytes(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


class NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse to build."""


def _unet_bytes(width=4, drop=(), extra=None, prefix="") -> bytes:
    state = {f"{prefix}{k}": v for k, v in _unet_state("ave", width).items() if k not in drop}
    return _state_bytes({**state, **(extra or {})})


def _flip_byte(member: str):
    def change(members: dict[str, bytes]) -> dict:
        data = bytearray(members[member])
        data[len(data) // 2] ^= 0xFF  # same size, different content: only the checksum can tell
        return dict(replace={member: bytes(data)}, rehash=False)

    return change


# Each case: (changes to the demo package, or a function of its members giving them; expected message).
# Expensive changes are functions, so that collecting the tests stays cheap.
BAD_CASES = {
    "missing manifest": (dict(drop=[MANIFEST]), "missing member manifest.json"),
    "missing weights": (dict(drop=[UNET]), "missing member weights/unet.pth"),
    "missing encoder": (dict(drop=[AUDIO_ENCODER]), "missing member weights/audio_encoder.pth"),
    "missing frame": (dict(drop=["frames/000003.jpg"]), "missing member frames/000003.jpg"),
    "missing crop boxes": (dict(drop=[CROP_BOXES]), "missing member crop_boxes.npy"),
    "frame dropped from manifest too": (
        dict(drop=["frames/000003.jpg"], edit=lambda m: m["members"].pop("frames/000003.jpg")),
        "required member frames/000003.jpg is not listed",
    ),
    "frame count too small": (dict(edit=lambda m: m.update(frame_count=11)), "unknown member 'frames/000011.jpg'"),
    "frame count too large": (dict(edit=lambda m: m.update(frame_count=13)), "required member frames/000012.jpg is not listed"),
    "sha256 mismatch": (_flip_byte("frames/000002.jpg"), "sha256 mismatch for frames/000002.jpg"),
    "sha256 mismatch in weights": (_flip_byte(UNET), "sha256 mismatch for weights/unet.pth"),
    "size mismatch": (
        lambda members: dict(replace={"frames/000002.jpg": members["frames/000002.jpg"] + b"\0"}, rehash=False),
        "size mismatch for frames/000002.jpg",
    ),
    "unlisted member": (dict(add=[(zipfile.ZipInfo("notes.txt"), b"hi")]), "member notes.txt is not listed"),
    "parent traversal": (dict(add=[(zipfile.ZipInfo("../evil.sh"), b"x")]), "unsafe member path '../evil.sh'"),
    "nested traversal": (dict(add=[(zipfile.ZipInfo("frames/../../evil"), b"x")]), "unsafe member path"),
    "absolute path": (dict(add=[(zipfile.ZipInfo("/etc/cron.d/evil"), b"x")]), "unsafe member path"),
    "backslash path": (dict(add=[(zipfile.ZipInfo("..\\evil"), b"x")]), "unsafe member path"),
    "symlink": (dict(add=[(_symlink("frames/link.jpg"), b"/etc/passwd")]), "is a symbolic link"),
    "duplicate": (dict(add=[(zipfile.ZipInfo("frames/000001.jpg"), b"x")]), "appears twice"),
    "invalid json": (dict(raw_manifest=b"{not json"), "manifest.json is not valid JSON"),
    "format version": (dict(edit=lambda m: m.update(format_version=2)), "unsupported format_version 2"),
    "format name": (dict(edit=lambda m: m.update(format="zip-of-stuff")), "format is 'zip-of-stuff'"),
    "field missing": (dict(edit=lambda m: m.pop("fps")), "field 'fps' is missing"),
    "field type": (dict(edit=lambda m: m.update(frame_count="12")), "field 'frame_count' must be int"),
    "bool is not int": (dict(edit=lambda m: m.update(model_width=True)), "field 'model_width' must be int"),
    "bad name": (dict(edit=lambda m: m.update(name="Demo Char")), "name 'Demo Char' is not valid"),
    "bad member entry": (
        dict(edit=lambda m: m["members"][UNET].update(sha256="XYZ")),
        r"members\['weights/unet.pth'\].sha256",
    ),
    "features without flag": (
        dict(edit=lambda m: m.update(has_default_audio=False)),
        "lists audio/default.wav but has_default_audio is false",
    ),
    "unet wrong shape": (lambda _: dict(replace={UNET: _unet_bytes(width=8)}), "does not fit: it holds a width-8 U-Net, not model_width 4"),
    "unet missing key": (lambda _: dict(replace={UNET: _unet_bytes(drop=["outc.conv.bias"])}), "missing keys: outc.conv.bias"),
    "unet extra key": (
        lambda _: dict(replace={UNET: _unet_bytes(extra={"extra.weight": torch.zeros(1)})}),
        "unexpected keys: extra.weight",
    ),
    "unet with module prefix": (lambda _: dict(replace={UNET: _unet_bytes(prefix="module.")}), "must be a bare state_dict"),
    "encoder with prefix": (
        lambda _: dict(replace={AUDIO_ENCODER: _state_bytes({f"audio_encoder.{k}": v for k, v in _encoder_state().items()})}),
        "weights/audio_encoder.pth checkpoint does not fit",
    ),
    # Claims that used to cost in proportion to their value (see test_claimed_numbers_cost_nothing_to_refuse).
    "frame count far beyond the members": (dict(edit=lambda m: m.update(frame_count=20_000_000)),
                                           "frame_count 20000000 is more than the 17 members it lists"),
    "image size beyond any frame": (dict(edit=lambda m: m.update(image_size=[65535, 65535])),
                                    r"image_size must be \[width, height\], each 1..8192"),
    "model width claimed": (dict(edit=lambda m: m.update(model_width=4096)),
                            "weights/unet.pth checkpoint does not fit: it holds a width-4 U-Net, not model_width 4096"),
    # What was refused, never torch's advice to re-run with weights_only=False (it would run the package's code).
    "pickled object": (lambda _: dict(replace={UNET: _state_bytes({"x": NotATensor()})}),
                       r"weights/unet.pth contains pickled Python objects other than tensors \(test_package.NotATensor\); "
                       r"packages may hold only tensors$"),
    "crop boxes short": (
        lambda _: dict(replace={CROP_BOXES: _npy(np.zeros((11, 4), np.int32))}),
        r"crop boxes have shape \(11, 4\)",
    ),
    "crop boxes dtype": (lambda _: dict(replace={CROP_BOXES: _npy(np.zeros((12, 4), np.float32))}), "crop boxes must be int32"),
    "crop box outside": (
        lambda _: dict(replace={CROP_BOXES: _npy(np.tile(np.array([[10, 10, 65, 50]], np.int32), (12, 1)))}),
        r"crop box 0 \(10, 10, 65, 50\) is empty or outside the 64x64 image",
    ),
    "crop boxes pickled": (
        lambda _: dict(replace={CROP_BOXES: _npy(np.array([{"x": 1}], dtype=object))}),
        "not a valid .npy",
    ),
    "frame wrong size": (
        lambda _: dict(replace={"frames/000005.jpg": _frame(0, size=(32, 32))}),
        "frames/000005.jpg is 32x32, the manifest says 64x64",
    ),
    "frame not jpeg": (
        lambda _: dict(replace={"frames/000004.jpg": _frame(0, size=(64, 64), ext="png")}),
        "frames/000004.jpg: not a JPEG",
    ),
    "features wrong dim": (
        lambda _: dict(replace={DEFAULT_FEATURES: _npy(np.zeros((20, 256), np.float32))}),
        r"default features have shape \(20, 256\), expected \(T, 512\)",
    ),
    "wav wrong rate": (lambda _: dict(replace={DEFAULT_AUDIO: _wav(rate=8000)}), "must be 16000 Hz mono"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_package_is_refused_and_leaves_nothing(case, demo_members, tmp_path):
    changes, message = BAD_CASES[case]
    changes = changes(demo_members) if callable(changes) else changes
    bad = _repack(demo_members, tmp_path / "bad.zip", **changes)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PackageError, match=message) as info:
        extract_package(bad, out / "demo")
    assert str(bad) in str(info.value)  # the error says which package
    assert "weights_only" not in str(info.value)  # never the advice to run the package's code
    assert list(out.iterdir()) == []  # no partial or temporary directory


def test_checkpoint_errors_are_checkpoint_errors(demo_members, tmp_path):
    bad = _repack(demo_members, tmp_path / "bad.zip", replace={UNET: _unet_bytes(width=8)})
    with pytest.raises(CheckpointError):
        verify_package(bad)


@pytest.mark.parametrize(
    "content, message",
    [(b"this is not a zip", "not a zip file"), (None, "not a zip file")],
    ids=["text", "truncated"],
)
def test_non_zip_files_are_refused(content, message, demo_package, tmp_path):
    path = tmp_path / "p.zip"
    path.write_bytes(content if content is not None else demo_package.read_bytes()[: 4000])
    with pytest.raises(PackageError, match=message):
        extract_package(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(PackageError, match="no such package file"):
        verify_package(tmp_path / "missing.zip")


@pytest.mark.parametrize(
    "limits, message",
    [
        (PackageLimits(max_member_bytes=100_000), r"member weights/\S+ declares \d+ bytes, over the limit of 100000"),
        (PackageLimits(max_total_bytes=1_000_000), "members declare more than the limit of 1000000 bytes in all"),
        # 12 frames + manifest, two weights, crop boxes, features, wav
        (PackageLimits(max_members=10), "too many members: 18, the limit is 10"),
    ],
)
def test_limits_are_enforced_before_extracting(limits, message, demo_package, tmp_path):
    with pytest.raises(PackageError, match=message):
        extract_package(demo_package, tmp_path / "out" / "demo", limits)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _set_declared_size(zip_bytes: bytes, name: str, size: int) -> bytes:
    """Make the central directory lie about a member's uncompressed size, as a zip bomb would."""
    data = bytearray(zip_bytes)
    encoded = name.encode()
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + name_len]) == encoded:
            struct.pack_into("<I", data, pos + 24, size)
            return bytes(data)
        pos += 4
    raise AssertionError(f"{name} not in the central directory")


def test_member_inflating_past_its_declared_size_is_refused(demo_members, tmp_path):
    big = b"\0" * 2_000_000  # deflates to ~2 kB
    members = dict(demo_members)
    members[DEFAULT_AUDIO] = big

    def declare_small(m):
        m["members"][DEFAULT_AUDIO] = {"sha256": hashlib.sha256(big[:1000]).hexdigest(), "size": 1000}

    staged = tmp_path / "staged.zip"
    members[MANIFEST] = json.dumps(_edited(json.loads(demo_members[MANIFEST]), declare_small)).encode()
    with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_set_declared_size(staged.read_bytes(), DEFAULT_AUDIO, 1000))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PackageError, match="member audio/default.wav (is corrupt|inflates past)"):
        extract_package(bomb, out / "demo")
    assert list(out.iterdir()) == []


def _edited(manifest: dict, edit) -> dict:
    edit(manifest)
    return manifest


def test_manifest_from_dict_round_trips(demo_members):
    manifest = Manifest.from_json(demo_members[MANIFEST])
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    unknown_fields_ignored = dict(json.loads(manifest.to_json()), comment="made by hand")
    assert Manifest.from_dict(unknown_fields_ignored) == manifest


# ------------------------------------------------------------------------------------------ CLI


def test_cli_demo_inspect_verify(tmp_path, capsys):
    out = tmp_path / "d.zip"
    argv = ["package", "demo", "--random-weights", "--name", "cli-demo", "--out", str(out), "--width", "4", "--frames", "6",
            "--size", "64x48", "--audio-seconds", "0.5", "--seed", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "frames:        6 x 64x48 jpg" in capsys.readouterr().out

    assert cli.main(["package", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "name:          cli-demo" in text and "audio mode:    ave (25 fps)" in text

    assert cli.main(["package", "inspect", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == read_manifest(out).to_dict()

    assert cli.main(["package", "verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("OK cli-demo 1")


def test_cli_verify_reports_a_bad_package(demo_members, tmp_path, capsys):
    bad = _repack(demo_members, tmp_path / "bad.zip", drop=["frames/000007.jpg"])
    assert cli.main(["package", "verify", str(bad)]) == 2
    assert "missing member frames/000007.jpg" in capsys.readouterr().err


def test_cli_build_from_a_synctalk_dataset(synctalk_dataset_dir, demo_checkpoints, tmp_path, capsys):
    unet, encoder = demo_checkpoints
    out = tmp_path / "built.zip"
    argv = ["package", "build", "--synctalk-dataset", str(synctalk_dataset_dir), "--checkpoint", str(unet),
            "--audio-encoder", str(encoder), "--name", "built", "--version", "7", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    manifest = verify_package(out)
    assert (manifest.name, manifest.version, manifest.model_width, manifest.frame_count) == ("built", "7", 4, 12)


def test_cli_build_reports_user_errors(synctalk_dataset_dir, demo_checkpoints, tmp_path, capsys):
    unet, _ = demo_checkpoints
    argv = ["package", "build", "--synctalk-dataset", str(synctalk_dataset_dir), "--checkpoint", str(unet),
            "--name", "x", "--out", str(tmp_path / "x.zip")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "needs the AVE audio encoder" in capsys.readouterr().err
    assert not (tmp_path / "x.zip").exists()


def test_lipsync_executable_verifies_packages(demo_package, demo_members, tmp_path):
    exe = shutil.which("lipsync")
    command = [exe] if exe else [sys.executable, "-m", "inference_pod.cli"]
    ok = subprocess.run([*command, "package", "verify", str(demo_package)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK demo 1")
    bad = _repack(demo_members, tmp_path / "bad.zip", edit=lambda m: m.update(format_version=9))
    failed = subprocess.run([*command, "package", "verify", str(bad)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "unsupported format_version 9" in failed.stderr


# ------------------------------------------------------------------------------------------ claims cost nothing

# Runs a lipsync command in a child under a 3 GiB address-space cap (a regression fails there instead of taking
# the machine down) and reports the child's peak RSS, its exit status and its stderr.
_PEAK_OF_COMMAND = r"""
import json, resource, subprocess, sys

def cap():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

proc = subprocess.run([sys.executable, "-m", "inference_pod.cli", *sys.argv[1:]], preexec_fn=cap,
                      capture_output=True, text=True, timeout=300)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr, "peak_mib": peak}))
"""


def _peak_of_command(*args, tmpdir: Path) -> dict:
    import os
    import subprocess
    import sys

    env = os.environ | {"TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_OF_COMMAND, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("command, edit, message", [
    # `package verify` built the U-Net at the claimed width: 23.5 GB and the kernel's OOM killer, before.
    ("verify", dict(model_width=4096), "weights/unet.pth checkpoint does not fit: it holds a width-4 U-Net, not model_width 4096"),
    # `package inspect` spent 93 s and 4.7 GB naming 20 million frames before refusing them.
    ("inspect", dict(frame_count=20_000_000), "frame_count 20000000 is more than the 17 members it lists"),
])
def test_claimed_numbers_cost_nothing_to_refuse(demo_package, demo_members, tmp_path, command, edit, message):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    bad = _repack(demo_members, tmp_path / "bad.zip", edit=lambda m: m.update(edit))
    baseline = _peak_of_command("package", command, demo_package, tmpdir=tmpdir)
    assert baseline["rc"] == 0, baseline["stderr"]
    refused = _peak_of_command("package", command, bad, tmpdir=tmpdir)
    assert refused["rc"] == 2 and message in refused["stderr"] and "Traceback" not in refused["stderr"]
    assert len(refused["stderr"].strip().splitlines()) == 1  # one line: the problem, and which package
    grown = refused["peak_mib"] - baseline["peak_mib"]
    assert grown < 40, f"refusing {edit} peaked {grown} MiB above checking the real package"
    assert list(tmpdir.iterdir()) == []  # no /tmp/lipsync-verify-* left behind, on either path


def test_a_zip_damaged_after_extraction_is_named_while_the_checked_copy_is_reused(written, tmp_path, caplog):
    path, _, manifest = written
    zip_path = tmp_path / "pkg.zip"
    shutil.copy(path, zip_path)
    dest = tmp_path / "pkg"
    extract_package(zip_path, dest)
    assert check_extracted_source(zip_path, dest) is None  # intact, and unchanged since: a stat
    with zipfile.ZipFile(zip_path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    _repack(members, zip_path, replace={manifest.frame_member(1): _frame(1)[:-40] + bytes(40)}, rehash=False,
            raw_manifest=members[MANIFEST])  # the manifest byte for byte: only a member's bytes differ
    with caplog.at_level("WARNING", logger="inference_pod.package.extract"):
        reused = extract_package(zip_path, dest)  # same manifest: the copy, checked when made, is served
    assert reused.frame_bytes(1) == _inputs()["frames"][1]
    problem = check_extracted_source(zip_path, dest)
    assert problem is not None and f"{zip_path} is damaged (sha256 mismatch for frames/000001.jpg)" in problem
    assert "replace the zip" in problem and any(problem in r.getMessage() for r in caplog.records)
    with pytest.raises(PackageError, match="sha256 mismatch for frames/000001.jpg"):
        verify_package(zip_path)  # verify always extracts afresh: it fails on the zip itself
