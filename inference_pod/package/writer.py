"""``write_package``: every input checked as a reader would, then one reproducible zip written atomically."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from inference_pod.core.model import AUDIO_FEATURE_SHAPES, normalize_state_dict
from inference_pod.errors import PackageError
from inference_pod.package.checks import (
    check_audio_encoder_state,
    check_crop_boxes,
    check_default_audio,
    check_default_features,
    check_unet_state,
)
from inference_pod.package.images import check_decodes, image_dimensions
from inference_pod.package.manifest import (
    AUDIO_ENCODER,
    CROP_BOXES,
    DEFAULT_AUDIO,
    DEFAULT_FEATURES,
    FRAME_EXTS,
    MANIFEST,
    UNET,
    Manifest,
    error_context,
    frame_member,
    is_int,
    validate_identifier,
)

# Fixed zip entry times: the same inputs (and SOURCE_DATE_EPOCH) give the same zip, byte for byte.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


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
    if not is_int(model_width) or model_width < 2 or model_width % 2:
        raise PackageError(f"model width must be an even number >= 2, got {model_width!r}")
    if not is_int(fps) or fps <= 0:
        raise PackageError(f"fps must be a positive integer, got {fps!r}")
    if frame_ext not in FRAME_EXTS:
        raise PackageError(f"frame extension {frame_ext!r} is not one of {list(FRAME_EXTS)}")
    if not frames:
        raise PackageError("a package needs at least one template frame")

    image_size: tuple[int, int] | None = None
    for i, data in enumerate(frames):
        with error_context(f"frame {i}"):
            size = image_dimensions(io.BytesIO(data), frame_ext)
        if image_size is None:
            image_size = size
        elif size != image_size:
            raise PackageError(f"frame {i} is {size[0]}x{size[1]} but frame 0 is {image_size[0]}x{image_size[1]}")
        check_decodes(bytes(data), f"frame {i}", image_size)  # a build must not carry a broken frame
    assert image_size is not None  # frames is not empty (checked above)

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
