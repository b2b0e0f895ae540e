"""The manifest: format v1's member names, identifiers, and the checked ``Manifest`` every reader trusts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from inference_pod.core.audio import FEATURE_CONTEXT
from inference_pod.core.model import AUDIO_FEATURE_SHAPES, MODE_FPS
from inference_pod.errors import PackageError

# Names and versions become Kubernetes-style identifiers, registry paths and Redis keys: one rule (IDENTIFIER),
# shared with the registry index and so with the operator.
from inference_pod.registry_index import IDENTIFIER, IDENTIFIER_RULE

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

# Frames are decoded whole (verify, the engine): a header's claim must not size a 65535x65535 buffer.
MAX_IMAGE_SIDE = 8192
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def frame_member(index: int, ext: str) -> str:
    return f"frames/{index:06d}.{ext}"


def feature_dim(mode: str) -> int:
    """Width of one feature row for ``mode``: the network's audio window holds 16 of them."""
    return int(np.prod(AUDIO_FEATURE_SHAPES[mode])) // (2 * FEATURE_CONTEXT)


def validate_identifier(value: Any, what: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise PackageError(
            f"{what} {value!r} is not valid: use {IDENTIFIER_RULE}"
        )
    return value


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
        """Parse and check every field and the member layout; unknown extra fields are ignored.

        Numbers are claims, bounded by what is there before anything costs in proportion to them: ``frame_count``
        by the members listed (which readers then match, one for one, against the zip's entries or the files).
        """
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
        if len(size) != 2 or not all(is_int(v) and 0 < v <= MAX_IMAGE_SIDE for v in size):
            raise PackageError(f"{MANIFEST}: image_size must be [width, height], each 1..{MAX_IMAGE_SIDE}, "
                               f"got {_short(size)}")
        frame_ext = _field(obj, "frame_ext", str)
        if frame_ext not in FRAME_EXTS:
            raise PackageError(f"{MANIFEST}: frame_ext {frame_ext!r} is not one of {list(FRAME_EXTS)}")
        created = _field(obj, "created", str)
        try:
            datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            raise PackageError(f"{MANIFEST}: created {created!r} is not an ISO 8601 time") from None
        raw_members = _field(obj, "members", dict)
        if frame_count > len(raw_members):  # before the layout check builds a name for every frame
            raise PackageError(f"{MANIFEST}: frame_count {frame_count} is more than the {len(raw_members)} "
                               "members it lists")
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
            members=_parse_members(raw_members),
            created=created,
        )
        _check_layout(manifest)
        return manifest


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(obj: dict, key: str, kind: type) -> Any:
    if key not in obj:
        raise PackageError(f"{MANIFEST}: field {key!r} is missing")
    value = obj[key]
    ok = is_int(value) if kind is int else isinstance(value, kind)
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
        if not is_int(size) or size < 0:
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


@contextmanager
def error_context(what: str) -> Iterator[None]:
    """Prefix a PackageError raised inside with what was being checked, keeping its type."""
    try:
        yield
    except PackageError as exc:
        if str(exc).startswith(what):
            raise
        raise type(exc)(f"{what}: {exc}") from None


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error message: what came in, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
