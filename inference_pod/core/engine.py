"""Batched SyncTalk_2D inference over (output frame, audio window) items.

Everything a frame needs from its template is prepared once, when the model loads: every template
frame is decoded, cropped and resized to 328x328 (bicubic). Where those crops then live is the
``template_storage`` setting (see TEMPLATE_STORAGES): resident on the device as uint8 ("device": a batch
is one gather on the device), in host memory ("host": the batch's crops are gathered into a staging
buffer, pinned on CUDA, and copied over), or losslessly PNG-encoded in host memory ("compressed": the
batch's crops are decoded in the engine's thread pool, then copied over). Either way a batch is then one
cast, one mask multiply and one network call, with the same numbers; on CUDA the device side of it is
captured in a CUDA graph per batch-size bucket.

The fp32 CPU path computes what SyncTalk_2D's inference_328.py computes. Two speed-ups apply on every
device because they keep its numbers: channels_last (bit-identical here) and BatchNorm folded into the
convolutions (at most one level apart on about one pixel in a million; ``fold_bn=False`` turns it
off). Reduced precision and CUDA graphs are CUDA's.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from inference_pod.core import audio
from inference_pod.core.jpeg_splice import (
    RegionBorder,
    ScanSegments,
    TemplateScans,
    encode_jpeg,
    frame_grid,
    jpeg_settings,
    splice,
    thread_scratch,
)
from inference_pod.core.model import (
    AUDIO_FEATURE_SHAPES,
    CROP_SIZE,
    MODEL_INPUT_SIZE,
    AveAudioEncoder,
    M,
    build_strict,
    build_unet,
)
from inference_pod.core.templates import TEMPLATE_STORAGES, pingpong_index
from inference_pod.errors import AudioError, InvalidInput, PackageError

log = logging.getLogger(__name__)

INNER = slice(4, 4 + MODEL_INPUT_SIZE)  # the 320x320 region inside the 328 crop
MASK_RECT = (5, 5, 310, 305)  # OpenCV (x, y, w, h) of the mouth mask drawn on the 320 region
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ENCODER_BATCH = 256
# Template encodings kept for splicing full-frame JPEGs: about 200 KB per 1080p template and quality.
DEFAULT_JPEG_CACHE_BYTES = 256 << 20
# PNG level of "compressed" templates: decoding costs about the same at every level, encoding is once.
PNG_LEVEL = 3

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _cpu_pool() -> ThreadPoolExecutor:
    """The engines' shared threads for decoding templates (at load, and per batch when compressed):
    OpenCV releases the GIL, so decoding scales with cores."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="lipsync-decode")
        return _pool


@dataclass(frozen=True)
class MemoryUse:
    """Bytes an engine holds, by where. ``device``: what the network's device holds for this model (its
    weights, and its templates when they are device-resident); ``host``: CPU memory (crops or their PNGs,
    the staging buffer, decoded full frames, template JPEGs). On a CPU engine both are RAM, split the same
    way so the modes compare. ``templates``: of those, the template store itself (device regions, host
    crops or PNGs), the part that grows with the template count. The model store's memory budget counts
    ``total``."""

    device: int
    host: int
    templates: int

    @property
    def total(self) -> int:
        return self.device + self.host


@dataclass(frozen=True)
class CropBox:
    """Where the prediction goes in the full frame: the crop [y1:y2, x1:x2] and its side before resizing."""

    x1: int
    y1: int
    x2: int
    y2: int
    size: int


@dataclass(frozen=True)
class FullFrameJpeg:
    data: bytes
    width: int
    height: int
    path: str  # "spliced" or "plain": see Engine.full_frame_jpeg


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


class _TemplateFrames:
    """Full template frames for compositing: decoded once if they fit the budget, else decoded on use."""

    def __init__(self, encoded: list[bytes], budget_bytes: int, first: np.ndarray):
        self._encoded = encoded
        per_frame = first.nbytes
        self._resident = per_frame * len(encoded) <= budget_bytes
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()
        self._capacity = len(encoded) if self._resident else max(1, budget_bytes // per_frame)
        self._lock = threading.Lock()
        self._decoded[0] = first
        # Kept as frames come and go: the model store reads them on every scrape and budget check.
        self._encoded_bytes = sum(len(b) for b in encoded)
        self._decoded_bytes = first.nbytes

    def get(self, index: int) -> np.ndarray:
        with self._lock:
            frame = self._decoded.get(index)
            if frame is not None:
                self._decoded.move_to_end(index)
                return frame
        frame = _decode_image(self._encoded[index], index)
        with self._lock:
            raced = self._decoded.get(index)  # another thread decoded it meanwhile: replaced, not added
            self._decoded[index] = frame
            self._decoded_bytes += frame.nbytes - (raced.nbytes if raced is not None else 0)
            while len(self._decoded) > self._capacity:
                self._decoded_bytes -= self._decoded.popitem(last=False)[1].nbytes
        return frame

    def nbytes(self) -> int:
        return self._decoded_bytes + self._encoded_bytes


def _encode_png(crop: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise PackageError("a template crop cannot be PNG-encoded")
    return data.tobytes()


def _decode_image(data: bytes, index: int) -> np.ndarray:
    frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)  # BGR, like cv2.imread
    if frame is None:
        raise PackageError(f"template frame {index} cannot be decoded")
    return frame


class _GraphedPredictor:
    """CUDA graphs of the whole batch step (gather, normalise, mask, network, quantise), one per bucket.

    Replaying a graph removes the per-layer launch overhead that dominates a small U-Net at small batches.
    Batches are padded up to the next bucket; captured lazily on first use of each bucket.
    """

    def __init__(self, step, input_shape: tuple[int, ...], input_dtype: torch.dtype, audio_shape, dtype, device,
                 max_batch: int):
        self._step = step
        self._input_shape = input_shape  # per item: () for template indices, (328, 328, 3) for crops
        self._input_dtype = input_dtype
        self._audio_shape = audio_shape
        self._dtype = dtype
        self._device = device
        self._buckets = sorted({1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch} | {max_batch})
        self._graphs: dict[int, tuple] = {}

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

    def _capture(self, bucket: int):
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


class Engine:
    """One character's network and templates on one device. See docs/ARCHITECTURE.md for the contract."""

    def __init__(
        self,
        package,
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
    ):
        if precision not in PRECISIONS:
            raise InvalidInput(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if template_storage not in TEMPLATE_STORAGES:
            raise InvalidInput(f"template storage must be one of {', '.join(TEMPLATE_STORAGES)}, got {template_storage!r}")
        self.template_storage = template_storage
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
        self._dtype = PRECISIONS[precision]
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

        # Shapes checked before anything is built: the manifest's width is a claim, the tensors are what is there.
        net = build_unet(self.mode, manifest.model_width, package.unet_state())
        net.eval()
        if fold_bn:
            net = fold_batchnorm(net)
        # channels_last: what cuDNN's tensor-core kernels and oneDNN's CPU kernels both run fastest on
        # (CPU: 1.6x at width 32, 4x at width 4, bit-identical results).
        # (torch's stubs leave memory_format out of Module.to's overloads; the runtime takes it.)
        net = net.to(self.device, self._dtype).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.net: nn.Module | None = net  # None once closed

        self.encoder: AveAudioEncoder | None = None
        encoder_state = package.audio_encoder_state()
        if encoder_state is not None:
            encoder = build_strict(AveAudioEncoder, encoder_state, "audio encoder")
            self.encoder = encoder.eval().to(self.device)  # fp32: cheap, and features feed every model

        self._load_templates(package, frame_budget_bytes)
        self._template_scans = TemplateScans(jpeg_cache_bytes)
        self._fixed: MemoryUse | None = None  # see _fixed_memory
        defaults = package.default_features()
        self.default_features = audio.pad_features(defaults.astype(np.float32)) if defaults is not None else None

        self._mask = torch.from_numpy(mouth_mask()).to(self.device, self._dtype)[None, None]
        self._predict_lock = threading.Lock()
        if template_storage == "device":
            graph_input: tuple[tuple[int, ...], torch.dtype] = ((), torch.long)
        else:
            graph_input = ((CROP_SIZE, CROP_SIZE, 3), torch.uint8)
        self._graphed = (_GraphedPredictor(self._step, *graph_input, self.audio_shape, self._dtype, self.device,
                                           max_batch) if cuda_graphs else None)

    @classmethod
    def from_package(cls, package, device: str = "cpu", precision: str = "fp32", max_batch: int = 32, **kwargs) -> Engine:
        return cls(package, device=device, precision=precision, max_batch=max_batch, **kwargs)

    # ------------------------------------------------------------------------------------- templates

    def _load_templates(self, package, frame_budget_bytes: int) -> None:
        boxes = np.asarray(package.crop_boxes(), dtype=np.int64)
        n = len(boxes)
        encoded = [package.frame_bytes(i) for i in range(n)]
        crops = np.empty((n, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)

        def prepare(i: int) -> tuple[CropBox, RegionBorder | None, np.ndarray | None]:
            x1, y1, x2, y2 = (int(v) for v in boxes[i])
            frame = _decode_image(encoded[i], i)
            crop = frame[y1:y2, x1:x2]
            if crop.size == 0:
                raise PackageError(f"crop box {i} ({x1}, {y1}, {x2}, {y2}) is empty inside a {frame.shape[1]}x{frame.shape[0]} frame")
            h, w = crop.shape[:2]
            crops[i] = cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
            box = CropBox(x1, y1, x1 + w, y1 + h, w)
            region = frame_grid(frame.shape[1], frame.shape[0]).region(box.x1, box.y1, box.x2, box.y2)
            border = RegionBorder(frame, region, (box.x1, box.y1, box.x2, box.y2)) if region is not None else None
            return box, border, frame if i == 0 else None  # full frames: see _TemplateFrames

        # Decoding thousands of template JPEGs is most of a model's load time; OpenCV releases the GIL.
        prepared = list(_cpu_pool().map(prepare, range(n)))
        self._boxes: list[CropBox] = [box for box, _, _ in prepared]
        self._borders: list[RegionBorder | None] = [border for _, border, _ in prepared]  # spliced frames' pixels
        first = prepared[0][2]
        assert first is not None  # prepare keeps template 0's full frame
        self._frames = _TemplateFrames(encoded, frame_budget_bytes, first)
        self.num_templates = n
        # Host crops: for compositing, and what "host" gathers from; "compressed" keeps their PNGs instead.
        self._crops: np.ndarray | None = None
        self._pngs: list[bytes] | None = None
        self._templates: torch.Tensor | None = None  # device-resident inner regions ("device" only)
        self._staging: torch.Tensor | None = None  # a batch's crops on the host, pinned on CUDA
        if self.template_storage == "compressed":  # the raw crops are dropped when this returns
            self._pngs = list(_cpu_pool().map(_encode_png, crops))
        else:
            self._crops = crops
        if self.template_storage == "device":
            inner = torch.from_numpy(np.ascontiguousarray(crops[:, INNER, INNER].transpose(0, 3, 1, 2)))
            self._templates = inner.to(self.device) if self.device.type == "cuda" else inner
        else:
            staging = torch.empty((self.max_batch, CROP_SIZE, CROP_SIZE, 3), dtype=torch.uint8)
            self._staging = staging.pin_memory() if self.device.type == "cuda" else staging

    def template_index(self, frame_id: int) -> int:
        return pingpong_index(frame_id, self.num_templates)

    def crop_box(self, template_id: int) -> CropBox:
        return self._boxes[template_id]

    # ------------------------------------------------------------------------------------- audio

    def _audio_encoder(self) -> AveAudioEncoder:
        if self.encoder is None:
            raise AudioError(
                f"model {self.name!r} uses {self.mode} features, which this server cannot compute from raw "
                "audio; send precomputed features or use the package's default track"
            )
        return self.encoder

    def track_features(self, wav16k: np.ndarray) -> np.ndarray:
        """AVE features of a whole 16 kHz track, first and last repeated: one row per output frame."""
        self._audio_encoder()  # no encoder: the clear error before any work
        audio.check_length(len(wav16k))
        windows = audio.mel_windows(audio.melspectrogram(wav16k))
        return audio.pad_features(self.encode_windows(windows))

    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """(n, 1, 80, 16) mel windows -> (n, 512) AVE embeddings."""
        encoder = self._audio_encoder()
        outs = []
        with torch.inference_mode():
            for start in range(0, len(windows), ENCODER_BATCH):
                chunk = torch.from_numpy(np.ascontiguousarray(windows[start : start + ENCODER_BATCH]))
                outs.append(encoder(chunk.to(self.device)).float().cpu())
        return torch.cat(outs).numpy()

    def windows(self, features: np.ndarray, frame_ids: Sequence[int]) -> np.ndarray:
        """Audio input of each output frame: (B, *audio_shape) float32."""
        return audio.feature_windows(features, frame_ids, self.audio_shape)

    # ------------------------------------------------------------------------------------- inference

    def _network(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError(f"the engine of model {self.name!r} is closed")
        return self.net

    def _crop(self, template_id: int, frame: np.ndarray | None = None) -> np.ndarray:
        """The template's 328x328 crop (read-only). Compressed templates are rebuilt: from the template's
        full frame when the caller has it decoded (the load's own crop and resize, so the same pixels),
        else from the PNG."""
        if self._crops is not None:
            return self._crops[template_id]
        assert self._pngs is not None
        if frame is not None:
            box = self._boxes[template_id]
            return cv2.resize(frame[box.y1 : box.y2, box.x1 : box.x2], (CROP_SIZE, CROP_SIZE),
                              interpolation=cv2.INTER_CUBIC)
        return _decode_image(self._pngs[template_id], template_id)

    def gather(self, template_ids: Sequence[int]) -> torch.Tensor:
        """What a batch's network input is built from, on the device: the template indices ("device"), or
        the templates' 328 crops gathered on the host (decoded first when "compressed") and copied over.
        Outside ``predict``, for benchmarks: it shares ``predict``'s staging buffer."""
        ids = torch.as_tensor(template_ids, dtype=torch.long)
        if self.template_storage == "device":
            return ids.to(self.device, non_blocking=True)
        staging = self._staging
        if staging is None:
            raise RuntimeError(f"the engine of model {self.name!r} is closed")
        b = len(ids)
        if b > len(staging):
            raise InvalidInput(f"a batch of {b} templates exceeds max batch {len(staging)}")
        batch = staging[:b]
        out, chosen = batch.numpy(), ids.tolist()
        if self._crops is not None:
            for slot, template in enumerate(chosen):  # a copy a crop: faster than index_select on uint8 here
                out[slot] = self._crops[template]
        else:
            pngs = self._pngs
            assert pngs is not None

            def decode(slot: int) -> None:
                out[slot] = _decode_image(pngs[chosen[slot]], chosen[slot])

            list(_cpu_pool().map(decode, range(b)))
        return batch.to(self.device, non_blocking=True) if self.device.type == "cuda" else batch

    def _step(self, templates: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        """Device-side batch: templates' inner regions, [reference, masked] / 255, network, x255 truncated to uint8.

        ``templates`` is what ``gather`` returns: indices into the device-resident regions, or the crops."""
        net = self._network()
        if self.template_storage == "device":
            if self._templates is None:
                raise RuntimeError(f"the engine of model {self.name!r} is closed")
            regions = self._templates.index_select(0, templates)
        else:
            regions = templates[:, INNER, INNER].permute(0, 3, 1, 2)
        reference = regions.to(self._dtype) / 255.0
        image = torch.cat([reference, reference * self._mask], dim=1).contiguous(memory_format=torch.channels_last)
        out = net(image, audio_windows)
        return (out.float() * 255).to(torch.uint8).permute(0, 2, 3, 1)

    def predict(self, template_ids: Sequence[int], audio_windows) -> np.ndarray:
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
            return np.stack([self._crop(int(t))[INNER, INNER] for t in ids])
        outputs = []
        step_size = self.device_batch
        with self._predict_lock, torch.inference_mode():
            # A gather holds at most max_batch crops (the staging buffer): predict's batches are the batcher's.
            for start in range(0, b, self.max_batch):
                templates = self.gather(ids[start : start + self.max_batch].tolist())
                for offset in range(0, len(templates), step_size):
                    s = start + offset
                    chunk = audio_t[s : s + step_size].to(self.device, self._dtype, non_blocking=True)
                    step = self._graphed if self._graphed is not None else self._step
                    outputs.append(step(templates[offset : offset + step_size], chunk).cpu())
        return torch.cat(outputs).numpy()

    def _paste(self, template_id: int, prediction: np.ndarray, dst: np.ndarray, frame: np.ndarray | None = None) -> None:
        """Write the crop box's new pixels into ``dst`` (the box's view of a frame or region): the
        prediction pasted into its 328 crop, resized back (bicubic) straight into place. ``frame``, the
        untouched template frame where the caller has it, spares compressed templates a PNG decode."""
        box = self._boxes[template_id]
        crop = thread_scratch("crop", (CROP_SIZE, CROP_SIZE, 3))
        template = self._crop(template_id, frame)
        top, bottom = INNER.start, INNER.stop  # only the crop's ring is the template's: a frame is memory-bound
        crop[:top], crop[bottom:] = template[:top], template[bottom:]
        crop[INNER, :top], crop[INNER, bottom:] = template[INNER, :top], template[INNER, bottom:]
        crop[INNER, INNER] = prediction
        out = cv2.resize(crop, (box.x2 - box.x1, box.y2 - box.y1), dst=dst, interpolation=cv2.INTER_CUBIC)
        if out is not dst:  # a layout OpenCV could not write into: copy
            dst[...] = out

    def composite(self, template_id: int, prediction: np.ndarray) -> np.ndarray:
        """The full frame: a copy of the template frame with the prediction pasted into its crop box."""
        box = self._boxes[template_id]
        template = self._frames.get(template_id)
        frame = template.copy()
        self._paste(template_id, prediction, frame[box.y1 : box.y2, box.x1 : box.x2], template)
        return frame

    def full_frame_jpeg(self, template_id: int, prediction: np.ndarray, quality: int) -> FullFrameJpeg:
        """``encode_image(composite(template_id, prediction))`` as JPEG, byte for byte, and how it was made.

        "spliced": only the restart-aligned region around the crop box was composited (from the template's
        border strips, not its full frame) and encoded; the rest of the bytes are the template's (see
        jpeg_splice). "plain": the whole frame was, the first time a template is asked for at a quality;
        that encoding is then kept as the template's, since outside the region the frame is its template.
        """
        border = self._borders[template_id]
        if border is None:  # the crop box is most of the frame
            frame = self.composite(template_id, prediction)
            height, width = frame.shape[:2]
            return FullFrameJpeg(encode_jpeg(frame, jpeg_settings(width, height, quality)), width, height, "plain")
        width, height = border.frame_size
        grid = frame_grid(width, height)
        settings = grid.settings(quality)
        key = (template_id, quality)
        template = self._template_scans.get(key)
        if template is None:
            with self._template_scans.first_encoding(key):
                template = self._template_scans.peek(key)  # another thread's, made while this one waited
                if template is None:
                    data = encode_jpeg(self.composite(template_id, prediction), settings)
                    self._template_scans.put(key, ScanSegments(data, grid.segments))
                    return FullFrameJpeg(data, width, height, "plain")
        canvas, box_pixels = border.canvas()
        self._paste(template_id, prediction, box_pixels)
        return FullFrameJpeg(splice(template, encode_jpeg(canvas, settings), grid, border.region), width, height,
                             "spliced")

    def template_crop(self, template_id: int) -> np.ndarray:
        """The template's inner 320x320 region (BGR), for side-by-side checks."""
        return self._crop(template_id)[INNER, INNER]

    def memory_use(self) -> MemoryUse:
        """Bytes this engine holds, on the device and on the host (see MemoryUse)."""
        fixed = self._fixed_memory()
        host = fixed.host + self._frames.nbytes() + self._template_scans.nbytes  # the caches grow after load
        return MemoryUse(device=fixed.device, host=host, templates=fixed.templates)

    def _fixed_memory(self) -> MemoryUse:
        """What does not change after load (weights, template store, borders, staging), summed once: it
        walks every template, and the model store asks on every metrics scrape and budget check."""
        if self._fixed is None:
            net = self._network()
            device = sum(t.numel() * t.element_size() for t in net.state_dict().values())
            if self.encoder is not None:
                device += sum(t.numel() * t.element_size() for t in self.encoder.state_dict().values())
            on_device = self._templates.numel() if self._templates is not None else 0
            on_host = self._crops.nbytes if self._crops is not None else 0
            on_host += sum(len(png) for png in self._pngs) if self._pngs is not None else 0
            host = on_host + sum(border.nbytes for border in self._borders if border is not None)
            host += self._staging.numel() if self._staging is not None else 0
            self._fixed = MemoryUse(device=device + on_device, host=host, templates=on_device + on_host)
        return self._fixed

    def memory_bytes(self) -> int:
        """Bytes this engine holds, device and host together: what the model store's memory budget counts."""
        return self.memory_use().total

    def close(self) -> None:
        """Release device memory now rather than at garbage collection."""
        self._graphed = None
        self.net = None
        self.encoder = None
        self._templates = None
        self._staging = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
