"""Content checks past checksums: crop boxes, arrays, the default wav, and weights loaded as tensors only."""

from __future__ import annotations

import io
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference_pod.core.audio import SAMPLE_RATE
from inference_pod.core.model import (
    AveAudioEncoder,
    build_strict,
    build_unet,
    load_tensors,
    normalize_state_dict,
)
from inference_pod.errors import CheckpointError, PackageError
from inference_pod.package.images import check_decodes, image_dimensions
from inference_pod.package.manifest import (
    AUDIO_ENCODER,
    CROP_BOXES,
    DEFAULT_AUDIO,
    DEFAULT_FEATURES,
    UNET,
    Manifest,
    error_context,
    feature_dim,
)


def load_state(path: Path, member: str) -> dict[str, torch.Tensor]:
    state = load_tensors(path, member)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{member} must hold a plain state_dict (a dict of name -> tensor)")
    return state


def load_npy(path: Path, member: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PackageError(f"{member} is not a valid .npy array: {exc}") from None


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
    build_unet(mode, width, state, what)  # shapes first: the width is only a claim


def check_audio_encoder_state(state: Mapping[str, torch.Tensor], what: str = AUDIO_ENCODER) -> None:
    _check_finite(state, what)
    build_strict(AveAudioEncoder, state, what)


def _check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{what}: {key} contains NaN or infinite values")


def validate_contents(root: Path, manifest: Manifest, *, tensors: bool, decode_frames: bool,
                      frame_headers: bool = True) -> None:
    """Everything past checksums: frame headers (or full decodes), crop boxes, arrays, wav, tensor shapes.
    ``frame_headers=False`` (and no decode) trusts frames that passed before, unchanged since."""
    width, height = manifest.image_size
    for i in range(manifest.frame_count if frame_headers or decode_frames else 0):
        member = manifest.frame_member(i)
        path = root / member
        with open(path, "rb") as fh, error_context(member):
            size = image_dimensions(fh, manifest.frame_ext)
        if size != manifest.image_size:
            raise PackageError(f"{member} is {size[0]}x{size[1]}, the manifest says {width}x{height}")
        if decode_frames:
            check_decodes(path.read_bytes(), member, manifest.image_size)
    with error_context(CROP_BOXES):
        check_crop_boxes(load_npy(root / CROP_BOXES, CROP_BOXES), manifest.frame_count, manifest.image_size)
    if manifest.has_default_audio:
        with error_context(DEFAULT_FEATURES):
            check_default_features(load_npy(root / DEFAULT_FEATURES, DEFAULT_FEATURES), manifest.audio_mode)
    if DEFAULT_AUDIO in manifest.members:
        check_default_audio((root / DEFAULT_AUDIO).read_bytes())
    if tensors:
        for member in (UNET, AUDIO_ENCODER):
            if member not in manifest.members:
                continue
            state = load_state(root / member, member)
            if set(normalize_state_dict(state)) != set(state):
                raise CheckpointError(f"{member} must be a bare state_dict (no wrapper, no 'module.' prefix)")
            if member == UNET:
                check_unet_state(state, manifest.audio_mode, manifest.model_width)
            else:
                check_audio_encoder_state(state)
