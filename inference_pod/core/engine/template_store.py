"""A character's templates as an engine holds them, prepared once at load: every template frame decoded,
its crop box cut and resized to 328x328 (bicubic), the border strips a spliced JPEG needs, and the full
frames for compositing (kept decoded within a budget).

Where the crops then live is the ``template_storage`` setting (see TEMPLATE_STORAGES): resident on the
device as uint8 ("device": a batch is one gather on the device), in host memory ("host": the batch's crops
are gathered into a staging buffer, pinned on CUDA, and copied over), or losslessly PNG-encoded in host
memory ("compressed": the batch's crops are decoded in the CPU pool, then copied over).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch

from inference_pod.core.encoding import decode_bgr, encode_png
from inference_pod.core.jpeg_splice import RegionBorder, frame_grid
from inference_pod.core.memory import MemoryUse
from inference_pod.core.model import CROP_SIZE, MODEL_INPUT_SIZE
from inference_pod.core.templates import TEMPLATE_STORAGES, pingpong_index
from inference_pod.errors import InvalidInput, PackageError

INNER = slice(4, 4 + MODEL_INPUT_SIZE)  # the 320x320 region inside the 328 crop
# PNG level of "compressed" templates: decoding costs about the same at every level, encoding is once.
PNG_LEVEL = 3


class TemplateSource(Protocol):
    """What the store reads from a character package."""

    def crop_boxes(self) -> Sequence[Sequence[int]] | np.ndarray: ...
    def frame_bytes(self, index: int) -> bytes: ...


@dataclass(frozen=True)
class CropBox:
    """Where the prediction goes in the full frame: the crop [y1:y2, x1:x2] and its side before resizing."""

    x1: int
    y1: int
    x2: int
    y2: int
    size: int


def decode_template(data: bytes, index: int) -> np.ndarray:
    frame = decode_bgr(data)
    if frame is None:
        raise PackageError(f"template frame {index} cannot be decoded")
    return frame


class TemplateFrames:
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
        frame = decode_template(self._encoded[index], index)
        with self._lock:
            raced = self._decoded.get(index)  # another thread decoded it meanwhile: replaced, not added
            self._decoded[index] = frame
            self._decoded_bytes += frame.nbytes - (raced.nbytes if raced is not None else 0)
            while len(self._decoded) > self._capacity:
                self._decoded_bytes -= self._decoded.popitem(last=False)[1].nbytes
        return frame

    def nbytes(self) -> int:
        return self._decoded_bytes + self._encoded_bytes


class TemplateStore:
    """One character's templates on one device, stored as ``storage`` says; ``cpu_pool`` decodes them."""

    def __init__(self, source: TemplateSource, storage: str, device: torch.device, max_batch: int,
                 frame_budget_bytes: int, cpu_pool: Executor, name: str = ""):
        if storage not in TEMPLATE_STORAGES:
            raise InvalidInput(f"template storage must be one of {', '.join(TEMPLATE_STORAGES)}, got {storage!r}")
        self.storage = storage
        self.device = device
        self.name = name
        self._cpu_pool = cpu_pool
        boxes = np.asarray(source.crop_boxes(), dtype=np.int64)
        n = len(boxes)
        encoded = [source.frame_bytes(i) for i in range(n)]
        crops = np.empty((n, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)

        def prepare(i: int) -> tuple[CropBox, RegionBorder | None, np.ndarray | None]:
            x1, y1, x2, y2 = (int(v) for v in boxes[i])
            frame = decode_template(encoded[i], i)
            crop = frame[y1:y2, x1:x2]
            if crop.size == 0:
                raise PackageError(f"crop box {i} ({x1}, {y1}, {x2}, {y2}) is empty inside a {frame.shape[1]}x{frame.shape[0]} frame")
            h, w = crop.shape[:2]
            crops[i] = cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
            box = CropBox(x1, y1, x1 + w, y1 + h, w)
            region = frame_grid(frame.shape[1], frame.shape[0]).region(box.x1, box.y1, box.x2, box.y2)
            border = RegionBorder(frame, region, (box.x1, box.y1, box.x2, box.y2)) if region is not None else None
            return box, border, frame if i == 0 else None  # full frames: see TemplateFrames

        # Decoding thousands of template JPEGs is most of a model's load time; OpenCV releases the GIL.
        prepared = list(cpu_pool.map(prepare, range(n)))
        self.boxes: list[CropBox] = [box for box, _, _ in prepared]
        self.borders: list[RegionBorder | None] = [border for _, border, _ in prepared]  # spliced frames' pixels
        first = prepared[0][2]
        assert first is not None  # prepare keeps template 0's full frame
        self.frames = TemplateFrames(encoded, frame_budget_bytes, first)
        self.count = n
        # Host crops: for compositing, and what "host" gathers from; "compressed" keeps their PNGs instead.
        self._crops: np.ndarray | None = None
        self._pngs: list[bytes] | None = None
        self._regions: torch.Tensor | None = None  # device-resident inner regions ("device" only)
        self._staging: torch.Tensor | None = None  # a batch's crops on the host, pinned on CUDA
        if storage == "compressed":  # the raw crops are dropped when this returns
            self._pngs = list(cpu_pool.map(lambda crop: encode_png(crop, PNG_LEVEL), crops))
        else:
            self._crops = crops
        if storage == "device":
            inner = torch.from_numpy(np.ascontiguousarray(crops[:, INNER, INNER].transpose(0, 3, 1, 2)))
            self._regions = inner.to(device) if device.type == "cuda" else inner
        else:
            staging = torch.empty((max_batch, CROP_SIZE, CROP_SIZE, 3), dtype=torch.uint8)
            self._staging = staging.pin_memory() if device.type == "cuda" else staging
        self._fixed: MemoryUse | None = None  # see fixed_memory

    def template_index(self, frame_id: int) -> int:
        return pingpong_index(frame_id, self.count)

    @property
    def gathered_item(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one item of what ``gather`` returns: an index, or a 328 crop."""
        return ((), torch.long) if self.storage == "device" else ((CROP_SIZE, CROP_SIZE, 3), torch.uint8)

    def crop(self, template_id: int, frame: np.ndarray | None = None) -> np.ndarray:
        """The template's 328x328 crop (read-only). Compressed templates are rebuilt: from the template's
        full frame when the caller has it decoded (the load's own crop and resize, so the same pixels),
        else from the PNG."""
        if self._crops is not None:
            return self._crops[template_id]
        assert self._pngs is not None
        if frame is not None:
            box = self.boxes[template_id]
            resized: np.ndarray = cv2.resize(frame[box.y1 : box.y2, box.x1 : box.x2], (CROP_SIZE, CROP_SIZE),
                                             interpolation=cv2.INTER_CUBIC)
            return resized
        return decode_template(self._pngs[template_id], template_id)

    def gather(self, template_ids: Sequence[int]) -> torch.Tensor:
        """What a batch's network input is built from, on the device: the template indices ("device"), or
        the templates' 328 crops gathered on the host (decoded first when "compressed") and copied over.
        Uses the one staging buffer: one gather at a time (the engine's predict lock)."""
        ids = torch.as_tensor(template_ids, dtype=torch.long)
        if self.storage == "device":
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
                out[slot] = decode_template(pngs[chosen[slot]], chosen[slot])

            list(self._cpu_pool.map(decode, range(b)))
        return batch.to(self.device, non_blocking=True) if self.device.type == "cuda" else batch

    def regions(self, gathered: torch.Tensor) -> torch.Tensor:
        """(B, 3, 320, 320) uint8 on the device: the inner regions of what ``gather`` returned."""
        if self.storage == "device":
            if self._regions is None:
                raise RuntimeError(f"the engine of model {self.name!r} is closed")
            return self._regions.index_select(0, gathered)
        return gathered[:, INNER, INNER].permute(0, 3, 1, 2)

    def fixed_memory(self) -> MemoryUse:
        """What does not change after load (template store, borders, staging), summed once: it walks every
        template, and the model store asks on every metrics scrape and budget check."""
        if self._fixed is None:
            on_device = self._regions.numel() if self._regions is not None else 0
            on_host = self._crops.nbytes if self._crops is not None else 0
            on_host += sum(len(png) for png in self._pngs) if self._pngs is not None else 0
            host = on_host + sum(border.nbytes for border in self.borders if border is not None)
            host += self._staging.numel() if self._staging is not None else 0
            self._fixed = MemoryUse(device=on_device, host=host, templates=on_device + on_host)
        return self._fixed

    def close(self) -> None:
        self._regions = None
        self._staging = None
