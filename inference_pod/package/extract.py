"""The character package, format v1: one zip holding everything a pod needs to serve one character.

Layout (see docs/PACKAGE_FORMAT.md)::

    manifest.json                  identity, model config, frame info, {member: {sha256, size}}
    weights/unet.pth               U-Net state_dict, exactly as SyncTalk_2D saves it
    weights/audio_encoder.pth      AVE encoder state_dict, keys without "audio_encoder." (required for ave)
    frames/000000.jpg ...          template frames, byte-exact copies of the source frames
    crop_boxes.npy                 (N, 4) int32: x1, y1, x2, y2 per frame
    audio/default_features.npy     (T, D) float32 default-track features, as SyncTalk_2D's aud_ave.npy (optional)
    audio/default.wav              16 kHz mono PCM16 default track (optional, only with the features)

Packages are untrusted input. Extraction accepts only the members the layout names (no traversal, links
or duplicates), enforces ``PackageLimits`` on declared sizes and again on the bytes actually inflated,
checks every checksum while streaming, validates the contents (crop boxes, arrays, wav, tensor shapes)
in a temporary sibling directory, and renames that into place only when all of it passed. Weights load
with ``torch.load(weights_only=True)`` and arrays with ``allow_pickle=False``: opening a package runs no
code from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import re
import shutil
import stat
import struct
import tempfile
import uuid
import wave
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import torch

from inference_pod.audio import FEATURE_CONTEXT, SAMPLE_RATE
from inference_pod.errors import CheckpointError, InvalidInput, PackageError
from inference_pod.model import (
    AUDIO_FEATURE_SHAPES,
    MODE_FPS,
    AveAudioEncoder,
    LipSyncUNet,
    load_strict,
    normalize_state_dict,
)

FORMAT_NAME = "lipsync-character"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
UNET = "weights/unet.pth"
AUDIO_ENCODER = "weights/audio_encoder.pth"
CROP_BOXES = "crop_boxes.npy"
DEFAULT_FEATURES = "audio/default_features.npy"
DEFAULT_AUDIO = "audio/default.wav"
FRAME_EXTS = ("jpg", "png")
# Directory entries some zip tools add; harmless, and skipped on extraction.
LAYOUT_DIRS = frozenset({"weights/", "frames/", "audio/"})

# Names and versions become Kubernetes-style identifiers, registry paths and Redis keys.
IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
# Fixed zip entry times: the same inputs (and SOURCE_DATE_EPOCH) give the same zip, byte for byte.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class PackageLimits:
    """Caps applied to untrusted packages; the defaults fit an hour of 1080p frames and width-32 weights."""

    max_member_bytes: int = 1 << 30
    max_total_bytes: int = 16 << 30
    max_members: int = 200_000


def frame_member(index: int, ext: str) -> str:
    return f"frames/{index:06d}.{ext}"


def feature_dim(mode: str) -> int:
    """Width of one feature row for ``mode``: the network's audio window holds 16 of them."""
    return int(np.prod(AUDIO_FEATURE_SHAPES[mode])) // (2 * FEATURE_CONTEXT)


def validate_identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise PackageError(
            f"{what} {value!r} is not valid: use 1-63 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


# ------------------------------------------------------------------------------------------ manifest


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    fps: int
    audio_mode: str
    model_width: int
    frame_count: int
    image_size: tuple[int, int]  # (width, height)
    frame_ext: str
    has_default_audio: bool  # the default track's features are present (its wav may be too)
    members: Mapping[str, Mapping[str, Any]]  # {path: {"sha256": hex, "size": bytes}}, all but the manifest
    created: str
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def frame_member(self, index: int) -> str:
        return frame_member(index, self.frame_ext)

    @property
    def total_bytes(self) -> int:
        return sum(int(m["size"]) for m in self.members.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "fps": self.fps,
            "audio_mode": self.audio_mode,
            "model_width": self.model_width,
            "frame_count": self.frame_count,
            "image_size": list(self.image_size),
            "frame_ext": self.frame_ext,
            "has_default_audio": self.has_default_audio,
            "created": self.created,
            "members": {path: {"sha256": m["sha256"], "size": m["size"]} for path, m in sorted(self.members.items())},
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"{MANIFEST} is not valid JSON: {exc}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Manifest:
        """Parse and check every field and the member layout; unknown extra fields are ignored."""
        if not isinstance(obj, dict):
            raise PackageError(f"{MANIFEST} must hold a JSON object")
        fmt = _field(obj, "format", str)
        if fmt != FORMAT_NAME:
            raise PackageError(f"{MANIFEST}: format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = _field(obj, "format_version", int)
        if version != FORMAT_VERSION:
            raise PackageError(f"{MANIFEST}: unsupported format_version {version} (this build reads {FORMAT_VERSION})")
        mode = _field(obj, "audio_mode", str)
        if mode not in AUDIO_FEATURE_SHAPES:
            raise PackageError(f"{MANIFEST}: audio_mode {mode!r} is not one of {sorted(AUDIO_FEATURE_SHAPES)}")
        fps = _field(obj, "fps", int)
        if fps != MODE_FPS[mode]:
            raise PackageError(f"{MANIFEST}: fps {fps} does not match audio_mode {mode!r} ({MODE_FPS[mode]} fps)")
        width = _field(obj, "model_width", int)
        if width < 2 or width % 2:
            raise PackageError(f"{MANIFEST}: model_width must be an even number >= 2, got {width}")
        frame_count = _field(obj, "frame_count", int)
        if frame_count < 1:
            raise PackageError(f"{MANIFEST}: frame_count must be >= 1, got {frame_count}")
        size = _field(obj, "image_size", list)
        if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
            raise PackageError(f"{MANIFEST}: image_size must be [width, height] of positive integers, got {size!r}")
        frame_ext = _field(obj, "frame_ext", str)
        if frame_ext not in FRAME_EXTS:
            raise PackageError(f"{MANIFEST}: frame_ext {frame_ext!r} is not one of {list(FRAME_EXTS)}")
        created = _field(obj, "created", str)
        try:
            datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            raise PackageError(f"{MANIFEST}: created {created!r} is not an ISO 8601 time") from None
        manifest = cls(
            name=validate_identifier(_field(obj, "name", str), f"{MANIFEST}: name"),
            version=validate_identifier(_field(obj, "version", str), f"{MANIFEST}: version"),
            fps=fps,
            audio_mode=mode,
            model_width=width,
            frame_count=frame_count,
            image_size=(int(size[0]), int(size[1])),
            frame_ext=frame_ext,
            has_default_audio=_field(obj, "has_default_audio", bool),
            members=_parse_members(_field(obj, "members", dict)),
            created=created,
        )
        _check_layout(manifest)
        return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(obj: dict, key: str, kind: type) -> Any:
    if key not in obj:
        raise PackageError(f"{MANIFEST}: field {key!r} is missing")
    value = obj[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise PackageError(f"{MANIFEST}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_members(raw: dict) -> dict[str, dict[str, Any]]:
    members = {}
    for path, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"sha256", "size"}:
            raise PackageError(f"{MANIFEST}: members[{path!r}] must be {{\"sha256\": ..., \"size\": ...}}")
        sha, size = entry["sha256"], entry["size"]
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
            raise PackageError(f"{MANIFEST}: members[{path!r}].sha256 is not 64 lowercase hex digits")
        if not _is_int(size) or size < 0:
            raise PackageError(f"{MANIFEST}: members[{path!r}].size must be a non-negative integer")
        members[path] = {"sha256": sha, "size": size}
    return members


def _check_layout(manifest: Manifest) -> None:
    """The members must be exactly the layout's: required ones present, nothing unknown."""
    frames = {manifest.frame_member(i) for i in range(manifest.frame_count)}
    required = {UNET, CROP_BOXES} | frames
    optional: set[str] = set()
    if manifest.audio_mode == "ave":
        required.add(AUDIO_ENCODER)
    else:
        optional.add(AUDIO_ENCODER)
    if manifest.has_default_audio:
        required.add(DEFAULT_FEATURES)
        optional.add(DEFAULT_AUDIO)
    listed = set(manifest.members)
    missing = sorted(required - listed)
    if missing:
        raise PackageError(f"{MANIFEST}: required member {missing[0]} is not listed ({len(missing)} missing)")
    unknown = sorted(listed - required - optional)
    if unknown:
        if unknown[0] in (DEFAULT_FEATURES, DEFAULT_AUDIO):
            raise PackageError(f"{MANIFEST}: lists {unknown[0]} but has_default_audio is false")
        raise PackageError(f"{MANIFEST}: unknown member {unknown[0]!r} (not part of format v{FORMAT_VERSION})")


# ------------------------------------------------------------------------------------------ the package


class CharacterPackage:
    """An extracted, checked package on disk. Members are read on demand."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest
        self._crop_boxes: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"CharacterPackage({self.manifest.name}:{self.manifest.version} at {self.root})"

    def member_path(self, member: str) -> Path:
        return self.root / member

    def unet_state(self) -> dict[str, torch.Tensor]:
        return _load_state(self.member_path(UNET), UNET)

    def audio_encoder_state(self) -> dict[str, torch.Tensor] | None:
        if AUDIO_ENCODER not in self.manifest.members:
            return None
        return _load_state(self.member_path(AUDIO_ENCODER), AUDIO_ENCODER)

    def frame_path(self, index: int) -> Path:
        try:
            index = operator.index(index)  # numpy integers too
        except TypeError:
            raise InvalidInput(f"template frame index must be an integer, got {index!r}") from None
        if not 0 <= index < self.manifest.frame_count:
            raise InvalidInput(f"template frame {index} is out of range 0..{self.manifest.frame_count - 1}")
        return self.member_path(self.manifest.frame_member(index))

    def frame_bytes(self, index: int) -> bytes:
        return self.frame_path(index).read_bytes()

    def crop_boxes(self) -> np.ndarray:
        if self._crop_boxes is None:
            boxes = _load_npy(self.member_path(CROP_BOXES), CROP_BOXES)
            boxes.flags.writeable = False  # shared between callers
            self._crop_boxes = boxes
        return self._crop_boxes

    def default_features(self) -> np.ndarray | None:
        if not self.manifest.has_default_audio:
            return None
        return _load_npy(self.member_path(DEFAULT_FEATURES), DEFAULT_FEATURES)

    def default_audio_path(self) -> Path | None:
        return self.member_path(DEFAULT_AUDIO) if DEFAULT_AUDIO in self.manifest.members else None


def _load_state(path: Path, member: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and storage errors all mean "not a usable checkpoint"
        raise CheckpointError(f"{member} is not a loadable state_dict: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{member} must hold a plain state_dict (a dict of name -> tensor)")
    return state


def _load_npy(path: Path, member: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PackageError(f"{member} is not a valid .npy array: {exc}") from None


# ------------------------------------------------------------------------------------------ contents


def image_dimensions(fh: BinaryIO, ext: str) -> tuple[int, int]:
    """(width, height) from a JPEG or PNG header, without decoding the image."""
    if ext == "png":
        head = fh.read(24)
        if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
            raise PackageError("not a PNG image")
        width, height = struct.unpack(">II", head[16:24])
    else:
        width, height = _jpeg_dimensions(fh)
    if width == 0 or height == 0:
        raise PackageError(f"image header declares an empty {width}x{height} image")
    return int(width), int(height)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(fh: BinaryIO) -> tuple[int, int]:
    if fh.read(2) != b"\xff\xd8":
        raise PackageError("not a JPEG image")
    while True:
        byte = fh.read(1)
        if byte != b"\xff":
            raise PackageError("JPEG image has no frame header")
        marker = 0xFF
        while marker == 0xFF:  # fill bytes
            nxt = fh.read(1)
            if not nxt:
                raise PackageError("JPEG image has no frame header")
            marker = nxt[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        if marker in (0xD9, 0xDA):
            raise PackageError("JPEG image has no frame header")
        raw = fh.read(2)
        if len(raw) < 2 or struct.unpack(">H", raw)[0] < 2:
            raise PackageError("JPEG image is truncated")
        length = struct.unpack(">H", raw)[0]
        if marker in _JPEG_SOF:
            sof = fh.read(5)
            if len(sof) < 5:
                raise PackageError("JPEG image is truncated")
            height, width = struct.unpack(">HH", sof[1:5])
            return width, height
        fh.seek(length - 2, os.SEEK_CUR)


def check_crop_boxes(boxes: Any, frame_count: int, image_size: tuple[int, int]) -> np.ndarray:
    """(N, 4) int32 boxes, each non-empty and inside the image."""
    boxes = np.asarray(boxes)
    if boxes.dtype != np.int32:
        raise PackageError(f"crop boxes must be int32, got {boxes.dtype}")
    if boxes.shape != (frame_count, 4):
        raise PackageError(f"crop boxes have shape {boxes.shape}, expected ({frame_count}, 4): one x1, y1, x2, y2 per frame")
    width, height = image_size
    x1, y1, x2, y2 = boxes.T
    bad = np.flatnonzero((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height) | (x2 <= x1) | (y2 <= y1))
    if bad.size:
        i = int(bad[0])
        raise PackageError(
            f"crop box {i} {tuple(int(v) for v in boxes[i])} is empty or outside the {width}x{height} image"
            + (f" ({bad.size} bad boxes)" if bad.size > 1 else "")
        )
    return boxes


def check_default_features(features: Any, mode: str) -> np.ndarray:
    features = np.asarray(features)
    if features.dtype != np.float32:
        raise PackageError(f"default features must be float32, got {features.dtype}")
    dim = feature_dim(mode)
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != dim:
        raise PackageError(f"default features have shape {features.shape}, expected (T, {dim}) for audio_mode {mode!r}")
    if not np.all(np.isfinite(features)):
        raise PackageError("default features contain NaN or infinite values")
    return features


def check_default_audio(data: bytes) -> None:
    """The default track must be a 16 kHz mono PCM16 WAV with at least one sample."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            rate, channels, width, frames = wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()
    except (wave.Error, EOFError) as exc:
        raise PackageError(f"{DEFAULT_AUDIO} is not a PCM WAV file: {exc}") from None
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2) or frames < 1:
        raise PackageError(
            f"{DEFAULT_AUDIO} must be {SAMPLE_RATE} Hz mono 16-bit PCM with samples, "
            f"got {rate} Hz, {channels} channel(s), {8 * width}-bit, {frames} samples"
        )


def check_unet_state(state: Mapping[str, torch.Tensor], mode: str, width: int, what: str = UNET) -> None:
    _check_finite(state, what)
    load_strict(LipSyncUNet(mode, width), state, what)


def check_audio_encoder_state(state: Mapping[str, torch.Tensor], what: str = AUDIO_ENCODER) -> None:
    _check_finite(state, what)
    load_strict(AveAudioEncoder(), state, what)


def _check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{what}: {key} contains NaN or infinite values")


def _validate_contents(root: Path, manifest: Manifest, *, tensors: bool, decode_frames: bool) -> None:
    """Everything past checksums: frame headers (or full decodes), crop boxes, arrays, wav, tensor shapes."""
    width, height = manifest.image_size
    for i in range(manifest.frame_count):
        member = manifest.frame_member(i)
        path = root / member
        with open(path, "rb") as fh, _context(member):
            size = image_dimensions(fh, manifest.frame_ext)
        if size != manifest.image_size:
            raise PackageError(f"{member} is {size[0]}x{size[1]}, the manifest says {width}x{height}")
        if decode_frames:
            _check_decodes(path.read_bytes(), member, manifest.image_size)
    with _context(CROP_BOXES):
        check_crop_boxes(_load_npy(root / CROP_BOXES, CROP_BOXES), manifest.frame_count, manifest.image_size)
    if manifest.has_default_audio:
        with _context(DEFAULT_FEATURES):
            check_default_features(_load_npy(root / DEFAULT_FEATURES, DEFAULT_FEATURES), manifest.audio_mode)
    if DEFAULT_AUDIO in manifest.members:
        check_default_audio((root / DEFAULT_AUDIO).read_bytes())
    if tensors:
        for member in (UNET, AUDIO_ENCODER):
            if member not in manifest.members:
                continue
            state = _load_state(root / member, member)
            if set(normalize_state_dict(state)) != set(state):
                raise CheckpointError(f"{member} must be a bare state_dict (no wrapper, no 'module.' prefix)")
            if member == UNET:
                check_unet_state(state, manifest.audio_mode, manifest.model_width)
            else:
                check_audio_encoder_state(state)


# What a complete file ends with: JPEG's end-of-image marker, PNG's IEND chunk (with its CRC).
_END_MARKERS = {b"\xff\xd8": b"\xff\xd9", b"\x89PNG": b"IEND\xaeB`\x82"}


def _check_decodes(data: bytes, member: str, image_size: tuple[int, int]) -> None:
    for magic, end in _END_MARKERS.items():
        # decoders fill a truncated image with grey rather than fail, so look for the end marker
        if data.startswith(magic) and not data.rstrip(b"\x00").endswith(end):
            raise PackageError(f"{member} is truncated (no end-of-image marker)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise PackageError(f"{member} does not decode as an image")
    if (image.shape[1], image.shape[0]) != tuple(image_size):
        raise PackageError(
            f"{member} decodes to {image.shape[1]}x{image.shape[0]}, the manifest says {image_size[0]}x{image_size[1]}"
        )


@contextmanager
def _context(what: str) -> Iterator[None]:
    """Prefix a PackageError raised inside with what was being checked, keeping its type."""
    try:
        yield
    except PackageError as exc:
        if str(exc).startswith(what):
            raise
        raise type(exc)(f"{what}: {exc}") from None


# ------------------------------------------------------------------------------------------ writing


def write_package(
    out_path,
    *,
    name: str,
    version: str,
    audio_mode: str,
    model_width: int,
    fps: int,
    frames: Sequence[bytes],
    frame_ext: str,
    crop_boxes,
    unet_state: Mapping[str, torch.Tensor],
    audio_encoder_state: Mapping[str, torch.Tensor] | None,
    default_features=None,
    default_audio: bytes | None = None,
) -> Manifest:
    """Check every input as extraction would, then write the zip atomically (temporary file + rename).

    ``frames`` are encoded image bytes (stored as given, never re-encoded); ``default_audio`` is a
    16 kHz mono PCM16 WAV and needs ``default_features``. Entry times are fixed and ``created`` honours
    SOURCE_DATE_EPOCH, so a build can be made reproducible byte for byte.
    """
    out_path = Path(out_path)
    validate_identifier(name, "package name")
    validate_identifier(version, "package version")
    if audio_mode not in AUDIO_FEATURE_SHAPES:
        raise PackageError(f"audio mode {audio_mode!r} is not one of {sorted(AUDIO_FEATURE_SHAPES)}")
    if not _is_int(model_width) or model_width < 2 or model_width % 2:
        raise PackageError(f"model width must be an even number >= 2, got {model_width!r}")
    if not _is_int(fps) or fps <= 0:
        raise PackageError(f"fps must be a positive integer, got {fps!r}")
    if frame_ext not in FRAME_EXTS:
        raise PackageError(f"frame extension {frame_ext!r} is not one of {list(FRAME_EXTS)}")
    if not frames:
        raise PackageError("a package needs at least one template frame")

    image_size = None
    for i, data in enumerate(frames):
        with _context(f"frame {i}"):
            size = image_dimensions(io.BytesIO(data), frame_ext)
        if image_size is None:
            image_size = size
        elif size != image_size:
            raise PackageError(f"frame {i} is {size[0]}x{size[1]} but frame 0 is {image_size[0]}x{image_size[1]}")
        _check_decodes(bytes(data), f"frame {i}", image_size)  # a build must not carry a broken frame

    boxes = np.asarray(crop_boxes)
    if boxes.dtype.kind not in "iu":
        raise PackageError(f"crop boxes must be integers, got {boxes.dtype}")
    if boxes.size and (boxes.min() < np.iinfo(np.int32).min or boxes.max() > np.iinfo(np.int32).max):
        raise PackageError("crop boxes do not fit in int32")
    boxes = check_crop_boxes(boxes.astype(np.int32), len(frames), image_size)

    unet_state = normalize_state_dict(unet_state)
    check_unet_state(unet_state, audio_mode, model_width, "U-Net")
    if audio_encoder_state is not None:
        audio_encoder_state = normalize_state_dict(audio_encoder_state, strip_prefixes=("module.", "audio_encoder."))
        check_audio_encoder_state(audio_encoder_state, "audio encoder")
    elif audio_mode == "ave":
        raise PackageError("ave mode needs the audio encoder's weights")

    members: dict[str, bytes] = {UNET: _tensor_bytes(unet_state), CROP_BOXES: _npy_bytes(boxes)}
    if audio_encoder_state is not None:
        members[AUDIO_ENCODER] = _tensor_bytes(audio_encoder_state)
    if default_features is not None:
        features = np.asarray(default_features)
        if features.dtype.kind != "f":
            raise PackageError(f"default features must be floating point, got {features.dtype}")
        members[DEFAULT_FEATURES] = _npy_bytes(check_default_features(features.astype(np.float32), audio_mode))
    if default_audio is not None:
        if default_features is None:
            raise PackageError("a default track's wav needs its features too (default_features)")
        check_default_audio(default_audio)
        members[DEFAULT_AUDIO] = bytes(default_audio)
    for i, data in enumerate(frames):
        members[frame_member(i, frame_ext)] = bytes(data)

    manifest = Manifest(
        name=name,
        version=version,
        fps=int(fps),
        audio_mode=audio_mode,
        model_width=int(model_width),
        frame_count=len(frames),
        image_size=image_size,
        frame_ext=frame_ext,
        has_default_audio=default_features is not None,
        members={path: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for path, data in members.items()},
        created=_created_time(),
    )
    manifest = Manifest.from_dict(manifest.to_dict())  # the same checks a reader applies (fps, layout)
    _write_zip(out_path, manifest.to_json(), members)
    return manifest


def _created_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc).replace(microsecond=0)
    return when.isoformat().replace("+00:00", "Z")


def _tensor_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    # Own, contiguous CPU storage per tensor: a view would drag its whole base storage into the file.
    plain = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(plain, buf)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_zip(out_path: Path, manifest_json: bytes, members: Mapping[str, bytes]) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for path, data in [(MANIFEST, manifest_json), *members.items()]:
                info = zipfile.ZipInfo(path, date_time=ZIP_EPOCH)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                # Frames are already compressed images; deflating them again only costs time.
                info.compress_type = zipfile.ZIP_STORED if path.startswith("frames/") else zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ reading


def read_manifest(path, limits: PackageLimits = PackageLimits()) -> Manifest:
    """The checked manifest of a package zip or extracted directory, without extracting anything."""
    path = Path(path)
    with _context(str(path)):
        if path.is_dir():
            return Manifest.from_json(_read_file_limited(path / MANIFEST, limits.max_member_bytes))
        return _zip_manifest(path, limits)[1]


def extract_package(zip_path, dest_dir, limits: PackageLimits = PackageLimits()) -> CharacterPackage:
    """Extract and check a package into ``dest_dir``, atomically; reuse ``dest_dir`` if it holds the same one."""
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    with _context(str(zip_path)), _open_zip(zip_path) as zf:
        entries = _checked_entries(zf, limits)
        manifest_bytes = _read_zip_manifest(zf, entries, limits)
        manifest = Manifest.from_json(manifest_bytes)
        _check_entries_match(entries, manifest)
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        if _holds(dest_dir, digest, manifest):
            return CharacterPackage(dest_dir, manifest)

        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest_dir.with_name(f".{dest_dir.name}.{uuid.uuid4().hex}.partial")
        try:
            tmp.mkdir()
            total = 0
            for member, expected in sorted(manifest.members.items()):
                total += _extract_member(zf, entries[member], tmp / member, expected, limits, total)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            _validate_contents(tmp, manifest, tensors=True, decode_frames=False)
            _install(tmp, dest_dir, digest, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CharacterPackage(dest_dir, manifest)


def open_package(path, cache_dir=None, limits: PackageLimits = PackageLimits()) -> CharacterPackage:
    """A package from a zip (extracted under ``cache_dir``, reused when already there) or an extracted dir.

    Directories are checked for structure (members present with their sizes, frame headers, crop boxes,
    arrays); ``verify_package`` also hashes every member and decodes every frame.
    """
    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path, limits)
        with _context(str(path)):
            _check_sizes(path, manifest)
            _validate_contents(path, manifest, tensors=False, decode_frames=False)
        return CharacterPackage(path, manifest)
    with _context(str(path)):
        manifest_bytes, manifest = _zip_manifest(path, limits)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return extract_package(path, cache / f"{manifest.name}-{manifest.version}-{digest[:16]}", limits)


def verify_package(path, limits: PackageLimits = PackageLimits()) -> Manifest:
    """The full check: layout, limits, every checksum, every frame decoded, crop boxes, arrays, tensor shapes."""
    path = Path(path)
    if not path.is_dir():
        with tempfile.TemporaryDirectory(prefix="lipsync-verify-") as tmp:
            package = extract_package(path, Path(tmp) / "package", limits)
            with _context(str(path)):
                _validate_contents(package.root, package.manifest, tensors=False, decode_frames=True)
            return package.manifest
    manifest = read_manifest(path, limits)
    with _context(str(path)):
        _check_sizes(path, manifest)
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
        unlisted = sorted(present - set(manifest.members) - {MANIFEST})
        if unlisted:
            raise PackageError(f"unlisted file {unlisted[0]} in the package directory")
        for member, expected in sorted(manifest.members.items()):
            digest = _file_sha256(path / member)
            if digest != expected["sha256"]:
                raise PackageError(f"sha256 mismatch for {member}: manifest {expected['sha256']}, file {digest}")
        _validate_contents(path, manifest, tensors=True, decode_frames=True)
    return manifest


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lipsync" / "packages"


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    if not path.exists():
        raise PackageError(f"no such package file: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise PackageError(f"not a zip file ({exc})") from None
    with zf:
        yield zf


def _zip_manifest(path: Path, limits: PackageLimits) -> tuple[bytes, Manifest]:
    with _open_zip(path) as zf:
        data = _read_zip_manifest(zf, _checked_entries(zf, limits), limits)
    return data, Manifest.from_json(data)


def _checked_entries(zf: zipfile.ZipFile, limits: PackageLimits) -> dict[str, zipfile.ZipInfo]:
    """Every entry is a safe, unique, plain file under the limits (declared sizes); returns files by name."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise PackageError(f"too many members: {len(infos)}, the limit is {limits.max_members}")
    entries: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        _check_member_path(name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise PackageError(f"member {name!r} is a symbolic link")
        if info.is_dir():
            if name not in LAYOUT_DIRS:
                raise PackageError(f"unknown directory entry {name!r}")
            continue
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # many writers leave the type bits at 0
            raise PackageError(f"member {name!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise PackageError(f"member {name!r} is encrypted")
        if name in entries:
            raise PackageError(f"member {name!r} appears twice")
        if info.file_size > limits.max_member_bytes:
            raise PackageError(f"member {name} declares {info.file_size} bytes, over the limit of {limits.max_member_bytes}")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise PackageError(f"members declare more than the limit of {limits.max_total_bytes} bytes in all")
        entries[name] = info
    return entries


def _check_member_path(name: str) -> None:
    """Refuse anything that could land outside the target directory, on any platform."""
    parts = name.rstrip("/").split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or re.match(r"^[A-Za-z]:", name)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise PackageError(f"unsafe member path {name!r}")


def _read_zip_manifest(zf: zipfile.ZipFile, entries: Mapping[str, zipfile.ZipInfo], limits: PackageLimits) -> bytes:
    if MANIFEST not in entries:
        raise PackageError(f"missing member {MANIFEST}")
    buf = io.BytesIO()
    _copy_member(zf, entries[MANIFEST], buf, limits.max_member_bytes)
    return buf.getvalue()


def _check_entries_match(entries: Mapping[str, zipfile.ZipInfo], manifest: Manifest) -> None:
    for member, expected in sorted(manifest.members.items()):
        if member not in entries:
            raise PackageError(f"missing member {member}")
        if entries[member].file_size != expected["size"]:
            raise PackageError(
                f"size mismatch for {member}: manifest {expected['size']} bytes, zip {entries[member].file_size}"
            )
    unlisted = sorted(set(entries) - set(manifest.members) - {MANIFEST})
    if unlisted:
        raise PackageError(f"member {unlisted[0]} is not listed in {MANIFEST}")


def _extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, expected: Mapping[str, Any], limits: PackageLimits, total: int
) -> int:
    """Stream one member to disk, hashing and counting; returns its size. Declared sizes are not trusted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    limit = min(int(expected["size"]), limits.max_member_bytes, limits.max_total_bytes - total)
    with open(target, "xb") as out:
        size, digest = _copy_member(zf, info, out, limit)
    if size != expected["size"]:
        raise PackageError(f"size mismatch for {info.filename}: manifest {expected['size']} bytes, inflated {size}")
    if digest != expected["sha256"]:
        raise PackageError(f"sha256 mismatch for {info.filename}: manifest {expected['sha256']}, content {digest}")
    return size


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: BinaryIO, limit: int) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PackageError(f"member {info.filename} inflates past {limit} bytes (declared {info.file_size})")
                sha.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise PackageError(f"member {info.filename} is corrupt: {exc}") from None
    return size, sha.hexdigest()


def _read_file_limited(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise PackageError(f"missing member {MANIFEST}") from None
    if len(data) > limit:
        raise PackageError(f"{MANIFEST} is larger than the limit of {limit} bytes")
    return data


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _check_sizes(root: Path, manifest: Manifest) -> None:
    for member, expected in sorted(manifest.members.items()):
        path = root / member
        if path.is_symlink() or not path.is_file():
            raise PackageError(f"missing member {member}")
        if path.stat().st_size != expected["size"]:
            raise PackageError(f"size mismatch for {member}: manifest {expected['size']} bytes, file {path.stat().st_size}")


def _holds(root: Path, manifest_digest: str, manifest: Manifest) -> bool:
    """Whether ``root`` is already this package, extracted: same manifest bytes, every member its size."""
    try:
        if hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest() != manifest_digest:
            return False
        _check_sizes(root, manifest)
    except (OSError, PackageError):
        return False
    return True


def _install(tmp: Path, dest: Path, digest: str, manifest: Manifest) -> None:
    """Rename the checked ``tmp`` to ``dest``; a different package already there is replaced."""
    try:
        os.replace(tmp, dest)  # atomic; succeeds when dest is absent or an empty directory
        return
    except OSError:
        if not dest.exists():
            raise
    if _holds(dest, digest, manifest):  # a concurrent extraction of the same package won the race
        return
    if not (dest / MANIFEST).is_file():  # never delete a directory we did not make
        raise PackageError(f"{dest} exists and is not an extracted package; refusing to replace it")
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def package_summary(manifest: Manifest) -> str:
    """Human-readable manifest summary (``lipsync package inspect``)."""
    width, height = manifest.image_size
    audio = "none"
    if manifest.has_default_audio:
        audio = "features" + (" + wav" if DEFAULT_AUDIO in manifest.members else "")
    lines = [
        f"name:          {manifest.name}",
        f"version:       {manifest.version}",
        f"format:        {manifest.format} v{manifest.format_version}",
        f"created:       {manifest.created}",
        f"audio mode:    {manifest.audio_mode} ({manifest.fps} fps)",
        f"model width:   {manifest.model_width}",
        f"frames:        {manifest.frame_count} x {width}x{height} {manifest.frame_ext}",
        f"audio encoder: {'yes' if AUDIO_ENCODER in manifest.members else 'no'}",
        f"default audio: {audio}",
        f"members:       {len(manifest.members) + 1} ({_human_bytes(manifest.total_bytes)} uncompressed)",
    ]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"

