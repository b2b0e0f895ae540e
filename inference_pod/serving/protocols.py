"""What the serving layer needs of an engine and of a batcher, as checkable Protocols.

``core.engine.Engine`` and ``batcher.Batcher`` implement them (mypy checks it where the data plane builds
them); tests and benchmarks may pass their own. The batcher, the pipeline, the live path, the model store
and the data plane are typed against these, so a type checker finds a missing method before a request does
-- and nothing in serving needs ``getattr`` to ask an engine what it can do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from inference_pod.core.memory import MemoryUse
from inference_pod.serving.batcher import BatchResult, Predictor


class Box(Protocol):
    """Where a prediction goes in its full frame (``core.engine.CropBox``)."""

    @property
    def x1(self) -> int: ...
    @property
    def y1(self) -> int: ...
    @property
    def x2(self) -> int: ...
    @property
    def y2(self) -> int: ...
    @property
    def size(self) -> int: ...


class EncodedFrame(Protocol):
    """A full frame as JPEG and how it was made (``core.engine.FullFrameJpeg``)."""

    @property
    def data(self) -> bytes: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def path(self) -> str: ...


class InferenceEngine(Predictor, Protocol):
    """One loaded character: templates, audio features, batched prediction, compositing and its memory."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def fps(self) -> int: ...
    audio_shape: tuple[int, ...]  # one frame's network audio input (a session builds silent ones)
    paste: str  # how composite() pastes: "exact" or "feather" (part of a full frame's cache key)
    @property
    def default_features(self) -> np.ndarray | None: ...

    def template_index(self, frame_id: int) -> int: ...
    def crop_box(self, template_id: int) -> Box: ...
    # audio: the whole-track path and the live path (LiveTrack) alike
    def require_audio_encoder(self) -> None: ...
    def track_features(self, wav16k: np.ndarray) -> np.ndarray: ...
    def encode_windows(self, windows: np.ndarray) -> np.ndarray: ...
    def windows(self, features: np.ndarray, frame_ids: Sequence[int]) -> np.ndarray: ...
    # finishing a frame, in the CPU pool
    def composite(self, template_id: int, prediction: np.ndarray) -> np.ndarray: ...
    def full_frame_jpeg(self, template_id: int, prediction: np.ndarray, quality: int) -> EncodedFrame: ...
    # the model store's budget and the model views
    def memory_use(self) -> MemoryUse: ...
    def close(self) -> None: ...


class FrameBatcher(Protocol):
    """A model's queue in front of its engine: items in, device batches out."""

    max_batch: int
    max_queue: int
    batches: int
    items: int

    @property
    def queue_depth(self) -> int: ...
    async def submit(self, template_id: int, window: np.ndarray, finish: Callable[[np.ndarray], Any] | None = None,
                     *, wait_for_space: bool = False) -> BatchResult: ...
    async def close(self) -> None: ...
