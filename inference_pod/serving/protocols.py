"""What the serving layer needs of an engine and of a batcher, as checkable Protocols.

``engine.Engine`` and ``batcher.Batcher`` implement them; tests and benchmarks may pass their own. The model
store, the pipeline and the pod are typed against these, so a type checker finds a missing method before a
request does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from inference_pod.serving.batcher import BatchResult


class InferenceEngine(Protocol):
    """One loaded character: templates, audio features, batched prediction and compositing."""

    name: str
    version: str
    mode: str
    fps: int
    num_templates: int
    default_features: np.ndarray | None

    def template_index(self, frame_id: int) -> int: ...
    def track_features(self, wav16k: np.ndarray) -> np.ndarray: ...
    def encode_windows(self, windows: np.ndarray) -> np.ndarray: ...
    def windows(self, features: np.ndarray, frame_ids: Sequence[int]) -> np.ndarray: ...
    def predict(self, template_ids: Sequence[int], audio_windows: Any) -> np.ndarray: ...
    def crop_box(self, template_id: int) -> Any: ...
    def composite(self, template_id: int, prediction: np.ndarray) -> np.ndarray: ...
    def memory_bytes(self) -> int: ...
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
