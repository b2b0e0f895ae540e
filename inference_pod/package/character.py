"""``CharacterPackage``: an extracted, checked package on disk, its members read on demand."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch

from inference_pod.errors import InvalidInput
from inference_pod.package.checks import load_npy, load_state
from inference_pod.package.manifest import (
    AUDIO_ENCODER,
    CROP_BOXES,
    DEFAULT_AUDIO,
    DEFAULT_FEATURES,
    UNET,
    Manifest,
)


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
        return load_state(self.member_path(UNET), UNET)

    def audio_encoder_state(self) -> dict[str, torch.Tensor] | None:
        if AUDIO_ENCODER not in self.manifest.members:
            return None
        return load_state(self.member_path(AUDIO_ENCODER), AUDIO_ENCODER)

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
            boxes = load_npy(self.member_path(CROP_BOXES), CROP_BOXES)
            boxes.flags.writeable = False  # shared between callers
            self._crop_boxes = boxes
        return self._crop_boxes

    def default_features(self) -> np.ndarray | None:
        if not self.manifest.has_default_audio:
            return None
        return load_npy(self.member_path(DEFAULT_FEATURES), DEFAULT_FEATURES)

    def default_audio_path(self) -> Path | None:
        return self.member_path(DEFAULT_AUDIO) if DEFAULT_AUDIO in self.manifest.members else None
