"""A character's templates as an engine holds them: every template frame's crop box, its 328x328 crop
(bicubic), the border strips a spliced JPEG needs, and the full frames for compositing (decoded on use,
kept within a budget). All of it is derived once per package version and node and memory-mapped by every
load after that (see core.prepared_templates); a source that is not a package on disk is derived in memory.

Where the crops then live is the ``template_storage`` setting (see TEMPLATE_STORAGES): resident on the
device as uint8 ("device": copied there in one pass; a batch is one gather on the device), in host memory
("host": the batch's crops are gathered from the mapped file, i.e. the node's page cache, shared by every
process holding the character, into a staging buffer, pinned on CUDA, and copied over), or losslessly
PNG-encoded in host memory ("compressed": the batch's crops are decoded in the CPU pool, then copied over).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from inference_pod.core.jpeg_splice import RegionBorder
from inference_pod.core.memory import MemoryUse
from inference_pod.core.model import CROP_SIZE, MODEL_INPUT_SIZE
from inference_pod.core.prepared_templates import PngCrops, PreparedTemplates, TemplateSource, decode_template
from inference_pod.core.templates import TEMPLATE_STORAGES, pingpong_index
from inference_pod.errors import InvalidInput

INNER = slice(4, 4 + MODEL_INPUT_SIZE)  # the 320x320 region inside the 328 crop
# PNG level of "compressed" templates: decoding costs about the same at every level, encoding is once.
PNG_LEVEL = 3


@dataclass(frozen=True)
class CropBox:
    """Where the prediction goes in the full frame: the crop [y1:y2, x1:x2] and its side before resizing."""

    x1: int
    y1: int
    x2: int
    y2: int
    size: int


class TemplateFrames:
    """Full template frames for compositing: decoded on use, kept once decoded if they all fit the budget,
    else the most recently used that do."""

    def __init__(self, prepared: PreparedTemplates, budget_bytes: int):
        self._prepared = prepared
        count = prepared.count
        per_frame = max(1, int(np.prod(prepared.frame_shape)))
        self._capacity = count if per_frame * count <= budget_bytes else max(1, budget_bytes // per_frame)
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._decoded_bytes = 0  # kept as frames come and go: read on every scrape and budget check

    def get(self, index: int) -> np.ndarray:
        with self._lock:
            frame = self._decoded.get(index)
            if frame is not None:
                self._decoded.move_to_end(index)
                return frame
        frame = decode_template(self._prepared.jpeg(index), index)
        with self._lock:
            raced = self._decoded.get(index)  # another thread decoded it meanwhile: replaced, not added
            self._decoded[index] = frame
            self._decoded_bytes += frame.nbytes - (raced.nbytes if raced is not None else 0)
            while len(self._decoded) > self._capacity:
                self._decoded_bytes -= self._decoded.popitem(last=False)[1].nbytes
        return frame

    def nbytes(self) -> int:
        """Decoded frames (the JPEGs are the prepared templates')."""
        return self._decoded_bytes


class _Borders(Sequence[RegionBorder | None]):
    """Each template's border strips, built (and checked) on first use, then kept."""

    def __init__(self, prepared: PreparedTemplates):
        self._prepared = prepared
        self._built: list[RegionBorder | None] = [None] * prepared.count
        self._done = np.zeros(prepared.count, dtype=bool)

    def __len__(self) -> int:
        return self._prepared.count

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not self._done[index]:
            self._built[index] = self._prepared.border(index)
            self._done[index] = True
        return self._built[index]


class TemplateStore:
    """One character's templates on one device, stored as ``storage`` says; ``cpu_pool`` decodes them."""

    def __init__(self, source: TemplateSource, storage: str, device: torch.device, max_batch: int,
                 frame_budget_bytes: int, cpu_pool: Executor, name: str = "", prepared: bool = True):
        if storage not in TEMPLATE_STORAGES:
            raise InvalidInput(f"template storage must be one of {', '.join(TEMPLATE_STORAGES)}, got {storage!r}")
        self.storage = storage
        self.device = device
        self.name = name
        self._cpu_pool = cpu_pool
        # Mapped when the source is a package on disk (prepared beside it once per node), else derived here.
        if prepared and hasattr(source, "root"):
            self.prepared = PreparedTemplates.open_or_prepare(source, cpu_pool)  # type: ignore[arg-type]
        else:
            self.prepared = PreparedTemplates.compute(source, cpu_pool)
        templates = self.prepared
        n = templates.count
        self.boxes: list[CropBox] = [CropBox(*row) for row in np.asarray(templates.boxes).tolist()]
        self.borders: Sequence[RegionBorder | None] = _Borders(templates)  # spliced frames' pixels
        self.frames = TemplateFrames(templates, frame_budget_bytes)
        self.count = n
        # "compressed" keeps the crops' PNGs instead (the mapped or derived crops go when this returns).
        self._pngs: PngCrops | None = None
        self._regions: torch.Tensor | None = None  # device-resident inner regions ("device" only)
        self._staging: torch.Tensor | None = None  # a batch's crops on the host, pinned on CUDA
        if storage == "compressed":
            self._pngs = templates.pngs(PNG_LEVEL, cpu_pool)
            templates.drop_crops()
        if storage == "device":
            self._regions = self._to_device(templates, device, cpu_pool)
        else:
            staging = torch.empty((max_batch, CROP_SIZE, CROP_SIZE, 3), dtype=torch.uint8)
            self._staging = staging.pin_memory() if device.type == "cuda" else staging
        self._fixed: MemoryUse | None = None  # see fixed_memory

    @staticmethod
    def _to_device(templates: PreparedTemplates, device: torch.device, cpu_pool: Executor) -> torch.Tensor:
        """The crops' inner regions as (N, 3, 320, 320) uint8 on ``device``, copied in one pass of chunks
        (each crop checked as it is read) rather than through a second full copy on the host."""
        n = templates.count
        regions = torch.empty((n, 3, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), dtype=torch.uint8, device=device)
        chunk = 256
        for start in range(0, n, chunk):
            ids = range(start, min(n, start + chunk))
            crops = np.stack(list(cpu_pool.map(templates.crop, ids)))
            inner = torch.from_numpy(np.ascontiguousarray(crops[:, INNER, INNER].transpose(0, 3, 1, 2)))
            regions[start : start + len(ids)].copy_(inner)
        return regions

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
        if self._pngs is None:
            return self.prepared.crop(template_id)
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
        if self._pngs is None:
            crop = self.prepared.crop
            for slot, template in enumerate(chosen):  # a copy a crop: faster than index_select on uint8 here
                out[slot] = crop(template)
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
        """What does not change after load (template store, borders, staging), summed once: the model
        store asks on every metrics scrape and budget check. Prepared templates mapped from the store are
        ``mapped`` (the node's page cache, shared); derived in memory, they are private ``host`` memory."""
        if self._fixed is None:
            on_device = self._regions.numel() if self._regions is not None else 0
            pngs = self._pngs.nbytes if self._pngs is not None else 0
            staging = self._staging.numel() if self._staging is not None else 0
            derived = self.prepared.nbytes
            mapped, private = (derived, 0) if self.prepared.mapped else (0, derived)
            if self._pngs is not None and self._pngs.mapped:
                mapped += pngs
            else:
                private += pngs
            self._fixed = MemoryUse(device=on_device, host=private + staging, mapped=mapped,
                                    templates=on_device + pngs + self.prepared.crops_nbytes)
        return self._fixed

    def close(self) -> None:
        self._regions = None
        self._staging = None
