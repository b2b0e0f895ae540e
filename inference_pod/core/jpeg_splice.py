"""Full-frame JPEGs for the cost of the mouth region: restart-marker splicing.

A baseline JPEG written with a restart interval is a run of entropy-coded segments, one per R MCUs in
raster order, separated by RST0..RST7 markers; the DC predictors reset at each marker, so a segment's bytes
depend only on its own MCUs. Every JPEG the service writes uses a restart interval that divides the MCUs
of a row, so segments never straddle a row, and the fixed (standard) Huffman tables. Then the segments of
an encoding of just an MCU-aligned region are, byte for byte, the segments of an encoding of the whole
frame that cover it (chroma is averaged within each MCU; a region that reaches the right or bottom edge is
padded by repeating its edge pixels exactly as the whole frame is). A frame made from a template thus
needs only its region encoded: the rest of its bytes are the template's, kept from an earlier encoding,
with the region's segments spliced in and the restart markers renumbered into the frame's sequence.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property

import cv2
import numpy as np

# Chroma subsampling -> (OpenCV's sampling-factor value, MCU width, MCU height).
SUBSAMPLINGS = {
    "420": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 16, 16),  # OpenCV's default, what the service writes
    "444": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, 8, 8),
}
DEFAULT_SUBSAMPLING = "420"
# Restart segments at least this wide: narrower ones cost marker bytes (2 a segment, plus padding bits),
# wider ones widen the region every frame encodes. 64 px adds about 2 % to a 1080p frame at quality 90.
MIN_SEGMENT_PX = 64
# A region larger than this share of the frame is encoded whole: splicing would save little.
MAX_REGION_FRACTION = 0.5

_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
_RST = [bytes((0xFF, 0xD0 + n)) for n in range(8)]


@dataclass(frozen=True)
class JpegSettings:
    """Everything that decides a JPEG's bytes besides its pixels."""

    quality: int
    subsampling: str = DEFAULT_SUBSAMPLING
    restart_mcus: int = 0  # MCUs per restart segment; 0: no restart markers

    def imencode_params(self) -> list[int]:
        # No IMWRITE_JPEG_OPTIMIZE: optimised Huffman tables depend on the whole image's statistics, the
        # standard ones do not, and splicing needs the region and the frame to share tables.
        return [cv2.IMWRITE_JPEG_QUALITY, self.quality,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SUBSAMPLINGS[self.subsampling][0],
                cv2.IMWRITE_JPEG_RST_INTERVAL, self.restart_mcus]


def encode_jpeg(bgr: np.ndarray, settings: JpegSettings) -> bytes:
    """Baseline JPEG of an (H, W, 3) uint8 BGR image (OpenCV: measured the fastest encoder here)."""
    ok, buf = cv2.imencode(".jpg", bgr, settings.imencode_params())
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {bgr.shape} image as JPEG")
    return buf.tobytes()


@dataclass(frozen=True)
class SpliceRegion:
    """The pixels [y0:y1, x0:x1] a spliced frame encodes: whole restart segments of MCU rows row0..row1-1."""

    x0: int
    y0: int
    x1: int
    y1: int
    row0: int
    row1: int
    seg0: int  # first segment column (segments counted within a row)
    seg1: int

    @property
    def segments(self) -> int:
        return (self.row1 - self.row0) * (self.seg1 - self.seg0)


@dataclass(frozen=True)
class FrameGrid:
    """The MCU grid and restart segments of JPEGs of one size and chroma subsampling."""

    width: int
    height: int
    subsampling: str = DEFAULT_SUBSAMPLING

    @cached_property  # every frame asks: computed once per grid
    def mcu(self) -> tuple[int, int]:
        _, w, h = SUBSAMPLINGS[self.subsampling]
        return w, h

    @cached_property
    def mcu_cols(self) -> int:
        return -(-self.width // self.mcu[0])

    @cached_property
    def mcu_rows(self) -> int:
        return -(-self.height // self.mcu[1])

    @cached_property
    def restart_mcus(self) -> int:
        """The fewest MCUs, dividing a row's, that span MIN_SEGMENT_PX: segments then tile each MCU row."""
        cols, mcu_w = self.mcu_cols, self.mcu[0]
        return next(d for d in range(1, cols + 1) if cols % d == 0 and (d * mcu_w >= MIN_SEGMENT_PX or d == cols))

    @cached_property
    def segments_per_row(self) -> int:
        return self.mcu_cols // self.restart_mcus

    @cached_property
    def segments(self) -> int:
        return self.mcu_rows * self.segments_per_row

    def settings(self, quality: int) -> JpegSettings:
        return JpegSettings(quality, self.subsampling, self.restart_mcus)

    def region(self, x1: int, y1: int, x2: int, y2: int,
               max_fraction: float = MAX_REGION_FRACTION) -> SpliceRegion | None:
        """The smallest whole-segment region holding pixels [y1:y2, x1:x2]; None if it is more than
        ``max_fraction`` of the frame (splicing would not pay) or the box is not inside the frame."""
        if not (0 <= x1 < x2 <= self.width and 0 <= y1 < y2 <= self.height):
            return None
        mcu_w, mcu_h = self.mcu
        seg_w = self.restart_mcus * mcu_w
        seg0, seg1 = x1 // seg_w, -(-x2 // seg_w)
        row0, row1 = y1 // mcu_h, -(-y2 // mcu_h)
        region = SpliceRegion(seg0 * seg_w, row0 * mcu_h, min(seg1 * seg_w, self.width), min(row1 * mcu_h, self.height),
                              row0, row1, seg0, seg1)
        area = (region.x1 - region.x0) * (region.y1 - region.y0)
        return region if area <= max_fraction * self.width * self.height else None


@cache
def frame_grid(width: int, height: int, subsampling: str = DEFAULT_SUBSAMPLING) -> FrameGrid:
    return FrameGrid(width, height, subsampling)


def jpeg_settings(width: int, height: int, quality: int) -> JpegSettings:
    """What every JPEG of this size is written with, so that any of them can be spliced."""
    return frame_grid(width, height).settings(quality)


_scratch = threading.local()


def thread_scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array of ``shape`` that this thread reuses call after call (valid until its next call with
    the same name). Frames are composited into these rather than into a fresh megabyte each, which the
    allocator may have to map (and the kernel fault in) again for every frame."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size:
        buffer = buffers[name] = np.empty(max(size, 1), dtype=np.uint8)
    return buffer[:size].reshape(shape)


class RegionBorder:
    """A template frame's pixels inside its splice region but outside its crop box: with the crop, all a
    spliced frame needs of the template, so the full frame is neither kept nor decoded to splice one (a
    character may have thousands of templates at 1080p). Kept as four strips around the box."""

    def __init__(self, frame: np.ndarray, region: SpliceRegion, box: tuple[int, int, int, int]):
        x1, y1, x2, y2 = box
        height, width = frame.shape[:2]
        self.frame_size = (width, height)
        self.region = region
        part = frame[region.y0 : region.y1, region.x0 : region.x1]
        self.shape = part.shape
        top, bottom, left, right = y1 - region.y0, y2 - region.y0, x1 - region.x0, x2 - region.x0
        self._box = (top, bottom, left, right)
        self._strips = (part[:top].copy(), part[bottom:].copy(), part[top:bottom, :left].copy(),
                        part[top:bottom, right:].copy())

    @classmethod
    def from_strips(cls, frame_size: tuple[int, int], region: SpliceRegion, box: tuple[int, int, int, int],
                    strips: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> RegionBorder:
        """A border from strips kept elsewhere (prepared templates map them): no full frame needed."""
        border = cls.__new__(cls)
        x1, y1, x2, y2 = box
        border.frame_size = frame_size
        border.region = region
        border.shape = (region.y1 - region.y0, region.x1 - region.x0, 3)
        border._box = (y1 - region.y0, y2 - region.y0, x1 - region.x0, x2 - region.x0)
        border._strips = strips
        return border

    @property
    def strips(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top, bottom, left and right of the crop box, as ``canvas`` lays them out."""
        return self._strips

    def canvas(self) -> tuple[np.ndarray, np.ndarray]:
        """The region's pixels with the border filled in, and the view of its crop box (left for the caller
        to fill): this thread's scratch array, valid until its next call."""
        out = thread_scratch("region", self.shape)
        top, bottom, left, right = self._box
        out[:top], out[bottom:], out[top:bottom, :left], out[top:bottom, right:] = self._strips
        return out, out[top:bottom, left:right]

    @property
    def nbytes(self) -> int:
        return sum(strip.nbytes for strip in self._strips)


class ScanSegments:
    """A baseline JPEG cut at its restart markers: segment k is ``data[starts[k]:ends[k]]``."""

    def __init__(self, data: bytes, expected_segments: int):
        if data[:2] != _SOI or data[-2:] != _EOI:
            raise ValueError("not a complete JPEG")
        pos = 2
        while True:  # marker segments up to and including the start of scan
            if pos + 4 > len(data) or data[pos] != 0xFF:
                raise ValueError(f"malformed JPEG header at byte {pos}")
            marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
            pos += 2 + length
            if marker == _SOS:
                break
        body = np.frombuffer(data, dtype=np.uint8)[pos:-2]
        # Inside entropy-coded data a 0xFF byte is always followed by 0x00, so FF D0..D7 are markers.
        markers = np.flatnonzero((body[:-1] == 0xFF) & ((body[1:] & 0xF8) == 0xD0)) + pos
        if len(markers) + 1 != expected_segments:
            raise ValueError(f"JPEG has {len(markers) + 1} restart segments, expected {expected_segments}")
        self.data = data
        self.starts = np.concatenate(([pos], markers + 2))
        self.ends = np.concatenate((markers, [len(data) - 2]))

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.starts.nbytes + self.ends.nbytes


def splice(template: ScanSegments, region_jpeg: bytes, grid: FrameGrid, region: SpliceRegion) -> bytes:
    """The frame's JPEG: ``template``'s bytes with the segments of ``region`` taken from ``region_jpeg``.

    ``template`` is any JPEG of a frame that equals this one outside the region, written with
    ``grid.settings(q)``; ``region_jpeg`` is the region's pixels written with the same settings.
    """
    part = ScanSegments(region_jpeg, region.segments)
    per_row = region.seg1 - region.seg0
    rows = region.row1 - region.row0
    frame_row_segments = grid.segments_per_row
    out = bytearray(region_jpeg)  # its markers are renumbered in place, then slices of it are copied out
    if per_row > 1:
        inner = np.arange(rows * per_row).reshape(rows, per_row)[:, :-1].ravel()  # markers inside a row
        k = (region.row0 + inner // per_row) * frame_row_segments + region.seg0 + inner % per_row
        np.frombuffer(out, dtype=np.uint8)[part.ends[inner] + 1] = 0xD0 + k % 8
    whole, spliced = memoryview(template.data), memoryview(out)
    row = np.arange(rows)
    first = (region.row0 + row) * frame_row_segments + region.seg0  # each region row's first frame segment
    # The template's bytes stop at the marker before each region row and resume at the frame's own marker
    # after it (or EOI); each region row runs from its first segment to the end of its last.
    stops, resumes = template.starts[first].tolist(), template.ends[first + per_row - 1].tolist()
    row_starts, row_ends = part.starts[row * per_row].tolist(), part.ends[row * per_row + per_row - 1].tolist()
    pieces: list[memoryview] = [whole[: stops[0]]] * (2 * rows + 1)
    pieces[1::2] = [spliced[a:b] for a, b in zip(row_starts, row_ends, strict=True)]
    pieces[2::2] = [whole[a:b] for a, b in zip(resumes, [*stops[1:], len(whole)], strict=True)]
    return b"".join(pieces)


class TemplateScans:
    """Parsed template encodings, keyed by (template, quality), within a byte budget.

    Frames walk the templates in a cycle, so plain least-recently-used eviction would miss on every frame
    once the templates outgrow the budget. Instead a full cache admits a newcomer only in place of an entry
    left unused for STALE_ROUNDS times as many lookups as it holds entries (a quality no longer asked for,
    a model's templates beyond the budget); otherwise it keeps the set it has, which keeps hitting.
    """

    STALE_ROUNDS = 8

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[tuple[int, int], ScanSegments] = OrderedDict()  # least recently used first
        self._last_used: dict[tuple[int, int], int] = {}
        self._lookups = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._encoding: dict[tuple[int, int], tuple[threading.Lock, list[int]]] = {}  # key -> (lock, [users])

    @contextmanager
    def first_encoding(self, key: tuple[int, int]) -> Iterator[None]:
        """Held while a template's frame is encoded whole to become its entry: frames of the same template
        that arrive meanwhile wait for it and splice, instead of each encoding the whole frame too."""
        with self._lock:
            lock, users = self._encoding.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if not users[0]:
                    del self._encoding[key]

    def get(self, key: tuple[int, int]) -> ScanSegments | None:
        with self._lock:
            self._lookups += 1
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self._last_used[key] = self._lookups
            return item

    def peek(self, key: tuple[int, int]) -> ScanSegments | None:
        """The entry, without counting a lookup (a second look on behalf of the same frame)."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple[int, int], scans: ScanSegments) -> None:
        if scans.nbytes > self.budget_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            while self._bytes + scans.nbytes > self.budget_bytes:
                oldest = next(iter(self._items))
                if self._lookups - self._last_used[oldest] <= self.STALE_ROUNDS * len(self._items):
                    return  # everything here is still in use: keep it
                self._bytes -= self._items.pop(oldest).nbytes
                del self._last_used[oldest]
            self._items[key] = scans
            self._last_used[key] = self._lookups
            self._bytes += scans.nbytes

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
