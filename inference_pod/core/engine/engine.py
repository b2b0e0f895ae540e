"""Batched SyncTalk_2D inference over (output frame, audio window) items: one character's network,
templates and compositing on one device (network.py, template_store.py, compositing.py).

Everything a frame needs from its template is prepared once per package version and node, and mapped
when the model loads (see template_store and core.prepared_templates).
A batch is then one gather, one cast, one mask multiply and one network call, with the same numbers
whatever the template storage; on CUDA the device side of it is captured in a CUDA graph per batch-size
bucket.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from inference_pod.core import audio
from inference_pod.core.engine.compositing import (
    DEFAULT_JPEG_CACHE_BYTES,
    Compositor,
    FullFrameJpeg,
    check_paste,
)
from inference_pod.core.engine.network import PRECISIONS, GraphedStep, Network
from inference_pod.core.engine.template_store import INNER, CropBox, TemplateFrames, TemplateStore
from inference_pod.core.memory import MemoryUse
from inference_pod.core.model import AUDIO_FEATURE_SHAPES, MODEL_INPUT_SIZE, AveAudioEncoder
from inference_pod.core.templates import TEMPLATE_STORAGES
from inference_pod.errors import InvalidInput

log = logging.getLogger(__name__)


class CharacterSource(Protocol):
    """What an engine reads from a character package (``inference_pod.package.CharacterPackage``)."""

    @property
    def manifest(self) -> Any: ...  # name, version, audio_mode, fps, model_width
    def unet_state(self) -> Mapping[str, torch.Tensor]: ...
    def audio_encoder_state(self) -> Mapping[str, torch.Tensor] | None: ...
    def default_features(self) -> np.ndarray | None: ...
    def crop_boxes(self) -> Sequence[Sequence[int]] | np.ndarray: ...
    def frame_bytes(self, index: int) -> bytes: ...


class Engine:
    """One character's network and templates on one device. See docs/ARCHITECTURE.md for the contract.

    ``cpu_pool`` decodes templates (at load, and per batch when compressed): the pod passes its one CPU pool;
    without one the engine starts its own and shuts it down on ``close``."""

    def __init__(
        self,
        package: CharacterSource,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int = 32,
        fold_bn: bool = True,
        cuda_graphs: bool | None = None,
        device_batch: int | None = None,
        frame_budget_bytes: int = 1 << 30,
        jpeg_cache_bytes: int = DEFAULT_JPEG_CACHE_BYTES,
        identity_network: bool = False,
        template_storage: str = "device",
        cpu_pool: Executor | None = None,
        paste: str = "exact",
        prepared_templates: bool = True,
    ):
        if precision not in PRECISIONS:
            raise InvalidInput(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if template_storage not in TEMPLATE_STORAGES:
            raise InvalidInput(f"template storage must be one of {', '.join(TEMPLATE_STORAGES)}, got {template_storage!r}")
        self.template_storage = template_storage
        self.paste = check_paste(paste)  # SyncTalk_2D's exact paste unless asked: see compositing
        if max_batch < 1:
            raise InvalidInput(f"max batch must be >= 1, got {max_batch}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInput("device 'cuda' requested but CUDA is not available")
        manifest = package.manifest
        self.name: str = manifest.name
        self.version: str = manifest.version
        self.mode: str = manifest.audio_mode
        self.fps: int = manifest.fps
        self.precision = precision
        self.max_batch = max_batch
        self.audio_shape: tuple[int, ...] = AUDIO_FEATURE_SHAPES[self.mode]
        on_cuda = self.device.type == "cuda"
        cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        if on_cuda:
            torch.backends.cudnn.benchmark = True  # batch shapes come in a few buckets: tuning pays once each
        # How many frames one network call takes. A GPU wants the whole batch; on a CPU the activations of
        # a 320x320 U-Net overflow the caches past one frame, so per-frame calls are fastest there
        # (measured: width 32, 2 cores, 6.3 FPS at 1 frame a call against 4.1 at 16).
        self.device_batch = min(max_batch, device_batch or (max_batch if on_cuda else 1))
        # Benchmark only: "predictions" are the templates' own regions, so a benchmark measures everything
        # but the network (what a pod carries once the network runs at GPU speed). Never a default.
        self.identity_network = identity_network
        if identity_network:
            log.warning("BENCHMARK IDENTITY NETWORK for model %r: frames are the templates' own mouth regions, "
                        "not lip-sync predictions", self.name)

        self.network = Network(self.name, self.mode, manifest.model_width, package.unet_state(),
                               package.audio_encoder_state(), self.device, precision, fold_bn)
        self._own_pool = cpu_pool is None
        self._cpu_pool = cpu_pool or ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                        thread_name_prefix=f"lipsync-templates-{self.name}")
        # prepared_templates: map what a package on disk derives from its frames, prepared once per node
        # (core.prepared_templates); False derives it in memory on every load.
        self.templates = TemplateStore(package, template_storage, self.device, max_batch, frame_budget_bytes,
                                       self._cpu_pool, self.name, prepared=prepared_templates)
        self.num_templates = self.templates.count
        self.compositor = Compositor(self.templates, jpeg_cache_bytes, paste)
        self._fixed: MemoryUse | None = None  # see _fixed_memory
        defaults = package.default_features()
        self.default_features = audio.pad_features(defaults.astype(np.float32)) if defaults is not None else None

        self._predict_lock = threading.Lock()
        self._graphed = (GraphedStep(self._step, *self.templates.gathered_item, self.audio_shape,
                                     self.network.dtype, self.device, max_batch) if cuda_graphs else None)

    @classmethod
    def from_package(cls, package: CharacterSource, device: str = "cpu", precision: str = "fp32",
                     max_batch: int = 32, **kwargs: Any) -> Engine:
        return cls(package, device=device, precision=precision, max_batch=max_batch, **kwargs)

    @property
    def net(self) -> nn.Module | None:
        """The U-Net; None once closed."""
        return self.network.unet

    @property
    def encoder(self) -> AveAudioEncoder | None:
        """The audio encoder; None when the package has none (then only precomputed features play)."""
        return self.network.encoder

    @property
    def _frames(self) -> TemplateFrames:
        return self.templates.frames

    # ------------------------------------------------------------------------------------- templates

    def template_index(self, frame_id: int) -> int:
        return self.templates.template_index(frame_id)

    def crop_box(self, template_id: int) -> CropBox:
        return self.templates.boxes[template_id]

    def template_crop(self, template_id: int) -> np.ndarray:
        """The template's inner 320x320 region (BGR), for side-by-side checks."""
        return self.templates.crop(template_id)[INNER, INNER]

    def gather(self, template_ids: Sequence[int]) -> torch.Tensor:
        """A batch's network input on the device (see TemplateStore.gather). Outside ``predict``, for
        benchmarks: it shares ``predict``'s staging buffer."""
        return self.templates.gather(template_ids)

    # ------------------------------------------------------------------------------------- audio

    def require_audio_encoder(self) -> None:
        """Raises the one "no audio encoder" error when this model cannot turn audio into features."""
        self.network.audio_encoder()

    def track_features(self, wav16k: np.ndarray) -> np.ndarray:
        """AVE features of a whole 16 kHz track, first and last repeated: one row per output frame."""
        self.require_audio_encoder()  # no encoder: the clear error before any work
        audio.check_length(len(wav16k))
        windows = audio.mel_windows(audio.melspectrogram(wav16k))
        return audio.pad_features(self.encode_windows(windows))

    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """(n, 1, 80, 16) mel windows -> (n, 512) AVE embeddings."""
        return self.network.encode_windows(windows)

    def windows(self, features: np.ndarray, frame_ids: Sequence[int]) -> np.ndarray:
        """Audio input of each output frame: (B, *audio_shape) float32."""
        return audio.feature_windows(features, frame_ids, self.audio_shape)

    # ------------------------------------------------------------------------------------- inference

    def _step(self, gathered: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        """Device-side batch from what ``gather`` returned: regions, network, uint8 (B, 320, 320, 3)."""
        return self.network.step(self.templates.regions(gathered), audio_windows)

    def predict(self, template_ids: Sequence[int], audio_windows: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 320, 320, 3) uint8 BGR predictions for B (template, audio window) pairs."""
        b = len(template_ids)
        if b == 0:
            return np.empty((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3), dtype=np.uint8)
        audio_t = torch.as_tensor(audio_windows)
        if tuple(audio_t.shape) != (b, *self.audio_shape):
            raise InvalidInput(f"audio windows must have shape ({b}, {', '.join(map(str, self.audio_shape))}), got {tuple(audio_t.shape)}")
        ids = torch.as_tensor(template_ids, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_templates:
            raise InvalidInput(f"template index out of range 0..{self.num_templates - 1}")
        if self.identity_network:  # benchmark only: no device work at all, the templates' own regions
            return np.stack([self.templates.crop(int(t))[INNER, INNER] for t in ids])
        outputs = []
        step_size = self.device_batch
        dtype = self.network.dtype
        with self._predict_lock, torch.inference_mode():
            # A gather holds at most max_batch crops (the staging buffer): predict's batches are the batcher's.
            for start in range(0, b, self.max_batch):
                gathered = self.gather(ids[start : start + self.max_batch].tolist())
                for offset in range(0, len(gathered), step_size):
                    s = start + offset
                    chunk = audio_t[s : s + step_size].to(self.device, dtype, non_blocking=True)
                    step = self._graphed if self._graphed is not None else self._step
                    outputs.append(step(gathered[offset : offset + step_size], chunk).cpu())
        result: np.ndarray = torch.cat(outputs).numpy()
        return result

    # ------------------------------------------------------------------------------------- compositing

    def composite(self, template_id: int, prediction: np.ndarray) -> np.ndarray:
        """The full frame: a copy of the template frame with the prediction pasted into its crop box."""
        return self.compositor.composite(template_id, prediction)

    def full_frame_jpeg(self, template_id: int, prediction: np.ndarray, quality: int) -> FullFrameJpeg:
        """The composited frame as JPEG, spliced where it can be (see Compositor.full_frame_jpeg)."""
        return self.compositor.full_frame_jpeg(template_id, prediction, quality)

    # ------------------------------------------------------------------------------------- memory

    def memory_use(self) -> MemoryUse:
        """Bytes this engine holds, on the device and on the host (see MemoryUse)."""
        fixed = self._fixed_memory()
        host = fixed.host + self.templates.frames.nbytes() + self.compositor.nbytes  # the caches grow after load
        return MemoryUse(device=fixed.device, host=host, templates=fixed.templates, mapped=fixed.mapped)

    def _fixed_memory(self) -> MemoryUse:
        """What does not change after load (weights, template store, borders, staging), summed once."""
        if self._fixed is None:
            stored = self.templates.fixed_memory()
            self._fixed = MemoryUse(device=self.network.weight_bytes() + stored.device, host=stored.host,
                                    templates=stored.templates, mapped=stored.mapped)
        return self._fixed

    def memory_bytes(self) -> int:
        """Bytes this engine holds, device and host together: what the model store's memory budget counts."""
        return self.memory_use().total

    def close(self) -> None:
        """Release device memory now rather than at garbage collection."""
        self._graphed = None
        self.network.close()
        self.templates.close()
        if self._own_pool:
            self._cpu_pool.shutdown(wait=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
