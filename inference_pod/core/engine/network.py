"""The networks of one loaded character on one device: the U-Net (precision, channels_last, BatchNorm
folded, CUDA graphs of the batch step) and the audio encoder that turns mel windows into AVE features.

The fp32 CPU path computes what SyncTalk_2D's inference_328.py computes. Two speed-ups apply on every
device because they keep its numbers: channels_last (bit-identical here) and BatchNorm folded into the
convolutions (at most one level apart on about one pixel in a million; ``fold_bn=False`` turns it
off). Reduced precision and CUDA graphs are CUDA's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import cv2
import numpy as np
import torch
from torch import nn

from inference_pod.core.model import (
    MODEL_INPUT_SIZE,
    AveAudioEncoder,
    M,
    build_strict,
    build_unet,
)
from inference_pod.core.precision import PRECISION_NAMES
from inference_pod.errors import AudioError

log = logging.getLogger(__name__)

MASK_RECT = (5, 5, 310, 305)  # OpenCV (x, y, w, h) of the mouth mask drawn on the 320 region
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
assert tuple(PRECISIONS) == PRECISION_NAMES
ENCODER_BATCH = 256

# regions (B, 3, 320, 320) uint8 on the device from what a batch gathered (template indices or crops)
Regions = Callable[[torch.Tensor], torch.Tensor]
GraphEntry = tuple["torch.cuda.CUDAGraph", torch.Tensor, torch.Tensor, torch.Tensor]


def mouth_mask() -> np.ndarray:
    """(320, 320) float32: 0 where SyncTalk_2D's filled rectangle blanks the mouth, 1 elsewhere."""
    canvas = np.ones((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), dtype=np.uint8)
    cv2.rectangle(canvas, MASK_RECT, 0, -1)  # same call, same pixel coverage as SyncTalk_2D
    return canvas.astype(np.float32)


def fold_batchnorm(module: M) -> M:
    """Fold every Conv2d followed by BatchNorm2d (eval mode) into the conv: one kernel instead of two."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    for conv_name, bn_name in (("conv3", "bn3"), ("conv5", "bn5")):  # the audio branch's named pairs
        named_conv, named_bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if isinstance(named_conv, nn.Conv2d) and isinstance(named_bn, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(named_conv, named_bn))
            setattr(module, bn_name, nn.Identity())
    return module


def no_audio_encoder(name: str, mode: str) -> AudioError:
    """The one answer to audio for a model whose package has no encoder for its features."""
    return AudioError(f"model {name!r} uses {mode} features, which this server cannot compute from audio "
                      "(its package has no audio encoder): omit audio to use its default track")


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class GraphedStep:
    """CUDA graphs of the whole batch step (gather, normalise, mask, network, quantise), one per bucket.

    Replaying a graph removes the per-layer launch overhead that dominates a small U-Net at small batches.
    Batches are padded up to the next bucket; captured lazily on first use of each bucket.
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_shape: tuple[int, ...],
                 input_dtype: torch.dtype, audio_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 max_batch: int):
        self._step = step
        self._input_shape = input_shape  # per item: () for template indices, (328, 328, 3) for crops
        self._input_dtype = input_dtype
        self._audio_shape = audio_shape
        self._dtype = dtype
        self._device = device
        self._buckets = sorted({1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch} | {max_batch})
        self._graphs: dict[int, GraphEntry] = {}

    def __call__(self, templates: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        b = templates.shape[0]
        bucket = next(x for x in self._buckets if x >= b)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, static_index, static_audio, static_out = self._graphs[bucket]
        static_index[:b].copy_(templates, non_blocking=True)
        static_index[b:].zero_()
        static_audio[:b].copy_(audio_windows, non_blocking=True)
        graph.replay()
        return static_out[:b]

    def _capture(self, bucket: int) -> GraphEntry:
        static_index = torch.zeros((bucket, *self._input_shape), dtype=self._input_dtype, device=self._device)
        static_audio = torch.zeros((bucket, *self._audio_shape), dtype=self._dtype, device=self._device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN autotuning, allocator)
            for _ in range(2):
                self._step(static_index, static_audio)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._step(static_index, static_audio)
        log.debug("captured CUDA graph for batch %d", bucket)
        return graph, static_index, static_audio, static_out


class Network:
    """The U-Net and the audio encoder of one character, on one device, at one precision."""

    def __init__(self, name: str, mode: str, width: int, unet_state: Mapping[str, torch.Tensor],
                 encoder_state: Mapping[str, torch.Tensor] | None, device: torch.device, precision: str,
                 fold_bn: bool = True):
        self.name = name
        self.mode = mode
        self.device = device
        self.dtype = PRECISIONS[precision]
        # Shapes checked before anything is built: the manifest's width is a claim, the tensors are what is there.
        net = build_unet(mode, width, unet_state)
        net.eval()
        if fold_bn:
            net = fold_batchnorm(net)
        # channels_last: what cuDNN's tensor-core kernels and oneDNN's CPU kernels both run fastest on
        # (CPU: 1.6x at width 32, 4x at width 4, bit-identical results).
        # (torch's stubs leave memory_format out of Module.to's overloads; the runtime takes it.)
        net = net.to(device, self.dtype).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.unet: nn.Module | None = net  # None once closed
        self.encoder: AveAudioEncoder | None = None
        if encoder_state is not None:
            encoder = build_strict(AveAudioEncoder, encoder_state, "audio encoder")
            self.encoder = encoder.eval().to(device)  # fp32: cheap, and features feed every model
        self._mask = torch.from_numpy(mouth_mask()).to(device, self.dtype)[None, None]

    def weight_bytes(self) -> int:
        """The U-Net's and the encoder's tensors, as they sit on the device."""
        held = _state_bytes(self._unet())
        return held + (_state_bytes(self.encoder) if self.encoder is not None else 0)

    def _unet(self) -> nn.Module:
        if self.unet is None:
            raise RuntimeError(f"the engine of model {self.name!r} is closed")
        return self.unet

    def step(self, regions: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        """Device-side batch: the templates' inner regions (B, 3, 320, 320) uint8, [reference, masked] / 255,
        network, x255 truncated to uint8, as (B, 320, 320, 3)."""
        reference = regions.to(self.dtype) / 255.0
        image = torch.cat([reference, reference * self._mask], dim=1).contiguous(memory_format=torch.channels_last)
        out = self._unet()(image, audio_windows)
        return (out.float() * 255).to(torch.uint8).permute(0, 2, 3, 1)

    def audio_encoder(self) -> AveAudioEncoder:
        if self.encoder is None:
            raise no_audio_encoder(self.name, self.mode)
        return self.encoder

    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """(n, 1, 80, 16) mel windows -> (n, 512) AVE embeddings."""
        encoder = self.audio_encoder()
        outs = []
        with torch.inference_mode():
            for start in range(0, len(windows), ENCODER_BATCH):
                chunk = torch.from_numpy(np.ascontiguousarray(windows[start : start + ENCODER_BATCH]))
                outs.append(encoder(chunk.to(self.device)).float().cpu())
        result: np.ndarray = torch.cat(outs).numpy()
        return result

    def close(self) -> None:
        self.unet = None
        self.encoder = None
