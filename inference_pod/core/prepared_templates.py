"""What a load derives from a character's template frames, computed once per package version and node and
then memory-mapped by every load: the clipped crop boxes, the 328x328 crops (bicubic), the border strips a
spliced JPEG needs, and the template JPEGs themselves, back to back.

On disk (``prepared_dir``: ``.{package dir}.templates`` beside the extracted package)::

    header.json        format and version, the package's name, version and manifest sha256, the count and
                       frame size, each file's dtype, shape and size, and the crc32 of the small files
    boxes.npy          (N, 5) int32: x1, y1, x2, y2 (clipped to the frame), side before resizing
    regions.npy        (N, 8) int32: the splice region around each box (SpliceRegion's fields), -1 for none
    border_offsets.npy (N+1,) int64: where each template's four border strips start in borders.u8
    jpeg_offsets.npy   (N+1,) int64: where each template's JPEG starts in frames.jpg
    checksums.npy      (N, 3) uint32: crc32 of each template's crop, border strips and JPEG
    crops.u8           (N, 328, 328, 3) uint8, raw: what ``host`` storage gathers from, mapped
    borders.u8         the strips, raw
    frames.jpg         the template JPEGs, raw
    png-level{L}/      added by the first ``compressed`` load (its own header, the crops' PNGs back to back,
                       their offsets and crc32s): later compressed loads map it instead of encoding again

Checked cheaply: opening reads the header and the small files in full (their crc32s, the package's
manifest hash, the format version, every size) and maps the large ones; a template's blocks (crop, strips,
JPEG) are checked against their crc32 the first time a load uses them. A full check of a 1080p character's
2.4 GB of crops would cost seconds of CPU on every load, the thing this layout exists to avoid; checking on
first use never serves an unchecked byte. A block that fails is rebuilt from the package's own frame (whose
sha256 was checked at extraction) for this load, and the prepared directory is removed, so the next load
prepares it again. Preparation writes a temporary sibling and renames it into place under a lock file, so
a load never sees a partial directory, and two processes never prepare the same package twice.

Light on purpose (numpy and OpenCV, no torch): ``lipsync package fetch`` prepares as it extracts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from inference_pod.core.encoding import decode_bgr, encode_png
from inference_pod.core.jpeg_splice import RegionBorder, SpliceRegion, frame_grid
from inference_pod.core.templates import TEMPLATE_CROP_SIZE as CROP_SIZE
from inference_pod.errors import PackageError

log = logging.getLogger(__name__)

PREPARED_FORMAT = "lipsync-prepared-templates"
PREPARED_VERSION = 1
HEADER = "header.json"
SMALL_FILES = ("boxes.npy", "regions.npy", "border_offsets.npy", "jpeg_offsets.npy", "checksums.npy")
CROPS, BORDERS, JPEGS = "crops.u8", "borders.u8", "frames.jpg"
PNGS, PNG_OFFSETS, PNG_CHECKSUMS = "crops.png", "offsets.npy", "checksums.npy"  # in png-level{L}/
CROP_SHAPE = (CROP_SIZE, CROP_SIZE, 3)
NO_REGION = -1


class TemplateSource(Protocol):
    """What preparation reads from a character package."""

    def crop_boxes(self) -> Sequence[Sequence[int]] | np.ndarray: ...
    def frame_bytes(self, index: int) -> bytes: ...


class PackageOnDisk(TemplateSource, Protocol):
    """An extracted package (``inference_pod.package.CharacterPackage``): prepared beside its root."""

    @property
    def root(self) -> Path: ...
    @property
    def manifest(self) -> Any: ...  # name, version, frame_count


def decode_template(data: bytes | memoryview, index: int) -> np.ndarray:
    frame = decode_bgr(data)
    if frame is None:
        raise PackageError(f"template frame {index} cannot be decoded")
    return frame


def prepared_dir(package_root: Path) -> Path:
    """Where an extracted package's prepared templates live: a hidden sibling, ignored by the catalog."""
    root = Path(package_root)
    return root.parent / f".{root.name}.templates"


def package_digest(package_root: Path) -> str:
    """The package's identity: its manifest's sha256 (the manifest names every member's sha256)."""
    return hashlib.sha256((Path(package_root) / "manifest.json").read_bytes()).hexdigest()


class Derived:
    """One template's derived data: the 328 crop, the clipped box, the splice region and its strips."""

    __slots__ = ("box", "crop", "frame_shape", "jpeg", "region", "strips")

    def __init__(self, jpeg: bytes, box_row: Sequence[int] | np.ndarray, index: int):
        frame = decode_template(jpeg, index)
        x1, y1, x2, y2 = (int(v) for v in box_row)
        crop = frame[y1:y2, x1:x2]
        if crop.size == 0:
            raise PackageError(f"crop box {index} ({x1}, {y1}, {x2}, {y2}) is empty inside a "
                               f"{frame.shape[1]}x{frame.shape[0]} frame")
        h, w = crop.shape[:2]
        self.jpeg = jpeg
        self.frame_shape = frame.shape
        self.crop: np.ndarray = cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
        self.box = (x1, y1, x1 + w, y1 + h, w)
        self.region = frame_grid(frame.shape[1], frame.shape[0]).region(x1, y1, x1 + w, y1 + h)
        border = RegionBorder(frame, self.region, self.box[:4]) if self.region is not None else None
        self.strips: tuple[np.ndarray, ...] = border.strips if border is not None else ()


def _region_row(region: SpliceRegion | None) -> list[int]:
    if region is None:
        return [NO_REGION] * 8
    return [region.x0, region.y0, region.x1, region.y1, region.row0, region.row1, region.seg0, region.seg1]


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).data)


class PreparedTemplates:
    """A character's derived template data: mapped from a prepared directory (``open``), or computed in
    memory (``compute``: stores that cannot be written, and sources that are not packages on disk)."""

    def __init__(self, *, boxes: np.ndarray, regions: np.ndarray, border_offsets: np.ndarray, borders: np.ndarray,
                 jpeg_offsets: np.ndarray, jpegs: np.ndarray, crops: np.ndarray, frame_shape: tuple[int, int, int],
                 checksums: np.ndarray | None = None, source: TemplateSource | None = None,
                 directory: Path | None = None):
        self.count = len(boxes)
        self.boxes = boxes
        self.frame_shape = frame_shape
        self._regions = regions
        self._border_offsets = border_offsets
        self._borders = borders
        self._jpeg_offsets = jpeg_offsets
        self._jpegs = jpegs
        self._crops: np.ndarray | None = crops
        # Mapped data is checked block by block on first use (see the module docstring); computed data is not.
        self._checksums = checksums
        self._checked = np.zeros((self.count, 3), dtype=bool) if checksums is not None else None
        self._repaired: dict[int, Derived] = {}
        self._source = source
        self.directory = directory
        self._lock = threading.Lock()

    @property
    def mapped(self) -> bool:
        return self._checksums is not None

    @property
    def crops_nbytes(self) -> int:
        return int(self._crops.nbytes) if self._crops is not None else 0

    def drop_crops(self) -> None:
        """Let the crops go (compressed storage keeps their PNGs instead)."""
        self._crops = None

    @property
    def nbytes(self) -> int:
        """Bytes of the derived data: file-backed pages when mapped (the node's page cache, shared by
        every process that maps them), private memory when computed."""
        return int(self.crops_nbytes + self._borders.nbytes + self._jpegs.nbytes + self.boxes.nbytes
                   + self._regions.nbytes + self._border_offsets.nbytes + self._jpeg_offsets.nbytes)

    # ------------------------------------------------------------------------------------- per template

    def crop(self, index: int) -> np.ndarray:
        """The template's 328x328 crop (read-only)."""
        self._check(index, 0)
        repaired = self._repaired.get(index)
        if repaired is not None:
            return repaired.crop
        if self._crops is None:
            raise RuntimeError("the crops were dropped (compressed storage keeps their PNGs)")
        return self._crops[index]

    def jpeg(self, index: int) -> bytes:
        """The template frame's JPEG, byte for byte the package's."""
        self._check(index, 2)
        repaired = self._repaired.get(index)
        if repaired is not None:
            return repaired.jpeg
        return self._jpegs[self._jpeg_offsets[index] : self._jpeg_offsets[index + 1]].tobytes()

    def border(self, index: int) -> RegionBorder | None:
        """The template's border strips around its crop box, or None where the frame is not spliced."""
        row = self._regions[index]
        if row[0] == NO_REGION:
            return None
        self._check(index, 1)
        region = SpliceRegion(*(int(v) for v in row))
        box = tuple(int(v) for v in self.boxes[index, :4])
        repaired = self._repaired.get(index)
        if repaired is not None:
            strips = repaired.strips
        else:
            strips = _split_strips(self._borders[self._border_offsets[index] : self._border_offsets[index + 1]],
                                   region, box)
        height, width = self.frame_shape[:2]
        return RegionBorder.from_strips((width, height), region, box, strips)  # type: ignore[arg-type]

    def check_all(self, pool: Executor | None = None) -> None:
        """Check every block now (device storage reads every crop anyway)."""
        if self._checked is None:
            return
        indices = range(self.count)
        if pool is None:
            for i in indices:
                self._check_template(i)
        else:
            list(pool.map(self._check_template, indices))

    def _check_template(self, index: int) -> None:
        for block in range(3):
            self._check(index, block)

    def _check(self, index: int, block: int) -> None:
        checked = self._checked
        if checked is None or checked[index, block]:
            return
        assert self._checksums is not None
        if block == 0:
            if self._crops is None:
                return
            data = self._crops[index]
        elif block == 1:
            data = self._borders[self._border_offsets[index] : self._border_offsets[index + 1]]
        else:
            data = self._jpegs[self._jpeg_offsets[index] : self._jpeg_offsets[index + 1]]
        if _crc(data) != int(self._checksums[index, block]):
            self._repair(index, ("crop", "border strips", "JPEG")[block])
        checked[index, block] = True

    def rederive(self, index: int) -> Derived:
        """Template ``index`` derived again from the package's own frame."""
        if self._source is None:
            raise PackageError(f"prepared template {index} is damaged and there is no package to rebuild it from")
        box = np.asarray(self._source.crop_boxes())[index]
        return Derived(self._source.frame_bytes(index), box, index)

    def pngs(self, level: int, pool: Executor) -> PngCrops:
        """The crops as PNGs at zlib ``level``: mapped from the prepared directory (written there by the first
        load that asks, under the preparation lock), else encoded in memory. Call before ``drop_crops``."""
        if self.directory is not None:
            directory = _png_dir(self.directory, level)
            opened = _open_pngs(self, directory, level)
            if opened is not None:
                return opened
            try:
                with _preparing(self.directory):
                    opened = _open_pngs(self, directory, level)  # another process may have written them
                    if opened is None:
                        _write_pngs(self, directory, level, pool)
                        opened = _open_pngs(self, directory, level)
            except OSError as exc:
                log.warning("cannot write the PNGs of %s (%s): encoding them in memory for this load",
                            self.directory, exc.strerror or exc)
            if opened is not None:
                return opened
        return PngCrops(list(pool.map(lambda i: encode_png(self.crop(i), level), range(self.count))))

    def _repair(self, index: int, what: str) -> None:
        """A damaged block: this load rebuilds the template from the package; the next load re-prepares."""
        with self._lock:
            if index in self._repaired:
                return
            if self._source is None:
                raise PackageError(f"prepared template {index}'s {what} is damaged")
            self._repaired[index] = self.rederive(index)
            log.warning("prepared templates in %s: template %d's %s is damaged; rebuilt from the package for "
                        "this load, and the directory removed so that the next load prepares it again",
                        self.directory, index, what)
            if self.directory is not None:
                discard(self.directory)

    # ------------------------------------------------------------------------------------- building

    @classmethod
    def compute(cls, source: TemplateSource, pool: Executor) -> PreparedTemplates:
        """Derive everything in memory (decoding every template on ``pool``): today's load without a store."""
        boxes = np.asarray(source.crop_boxes(), dtype=np.int64)
        n = len(boxes)
        crops = np.empty((n, *CROP_SHAPE), dtype=np.uint8)
        parts = _Parts(n)
        for i, derived in enumerate(_derive_all(source, boxes, pool)):
            crops[i] = derived.crop
            strips, jpeg = parts.add(i, derived)
            parts.strips.append(strips)
            parts.jpegs.append(jpeg)
        return cls(crops=crops, **parts.arrays())

    @classmethod
    def open_or_prepare(cls, package: PackageOnDisk, pool: Executor) -> PreparedTemplates:
        """The package's prepared templates, mapped; prepared first when missing, stale or damaged. Falls
        back to computing in memory when the store cannot be written (read-only, full)."""
        directory = prepared_dir(package.root)
        try:
            digest = package_digest(package.root)
        except OSError as exc:
            raise PackageError(f"cannot read {package.root}/manifest.json: {exc.strerror}") from None
        opened = _try_open(cls, directory, package, digest)
        if isinstance(opened, PreparedTemplates):
            return opened
        try:
            with _preparing(directory):
                opened = _try_open(cls, directory, package, digest)  # another process may have prepared it
                if isinstance(opened, PreparedTemplates):
                    return opened
                if opened != "missing":
                    log.info("preparing templates again in %s: %s", directory, opened)
                write_prepared(package, directory, digest, pool)
        except OSError as exc:
            log.warning("cannot prepare templates in %s (%s): computing them in memory for this load",
                        directory.parent, exc.strerror or exc)
            return cls.compute(package, pool)
        opened = _try_open(cls, directory, package, digest)
        if isinstance(opened, PreparedTemplates):
            return opened
        raise PackageError(f"templates prepared in {directory} cannot be opened: {opened}")


class PngCrops:
    """The crops as PNGs (``compressed`` storage): mapped from the prepared directory's ``png-level{L}/``
    (written by the first compressed load of the package on the node), or encoded in memory when there is
    no prepared directory to write to. Mapped PNGs are checked against their crc32 on first use; a damaged
    one is encoded again from the package's frame for this load, and the PNG directory removed."""

    def __init__(self, blob: np.ndarray | list[bytes], offsets: np.ndarray | None = None,
                 checksums: np.ndarray | None = None, templates: PreparedTemplates | None = None,
                 level: int = 0, directory: Path | None = None):
        self._blob, self._offsets, self._checksums = blob, offsets, checksums
        self._templates, self._level, self.directory = templates, level, directory
        self._checked = np.zeros(len(self), dtype=bool) if checksums is not None else None
        self._repaired: dict[int, bytes] = {}
        self._lock = threading.Lock()

    @property
    def mapped(self) -> bool:
        return self._offsets is not None

    @property
    def nbytes(self) -> int:
        if isinstance(self._blob, list):
            return sum(len(png) for png in self._blob)
        return int(self._blob.nbytes + (self._offsets.nbytes if self._offsets is not None else 0))

    def __len__(self) -> int:
        return len(self._blob) if isinstance(self._blob, list) else len(self._offsets) - 1  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> bytes | memoryview:
        if isinstance(self._blob, list):
            return self._blob[index]
        assert self._offsets is not None and self._checksums is not None and self._checked is not None
        repaired = self._repaired.get(index)
        if repaired is not None:
            return repaired
        png = self._blob[self._offsets[index] : self._offsets[index + 1]]
        if not self._checked[index]:
            if _crc(png) != int(self._checksums[index]):
                return self._repair(index)
            self._checked[index] = True
        return png.data

    def _repair(self, index: int) -> bytes:
        """A damaged PNG: encoded again from the package's frame; the next compressed load rewrites them all."""
        with self._lock:
            if index not in self._repaired:
                assert self._templates is not None
                self._repaired[index] = encode_png(self._templates.rederive(index).crop, self._level)
                log.warning("prepared PNG of template %d in %s is damaged; encoded again for this load, and the "
                            "PNGs removed so that the next compressed load writes them again", index, self.directory)
                if self.directory is not None:
                    discard(self.directory)
            return self._repaired[index]


def _png_dir(directory: Path, level: int) -> Path:
    return directory / f"png-level{level}"


def _write_pngs(templates: PreparedTemplates, directory: Path, level: int, pool: Executor) -> None:
    """Encode every crop at ``level`` into ``directory``, atomically (a temporary sibling, renamed)."""
    n = templates.count
    tmp = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}.partial")
    tmp.mkdir()
    try:
        offsets = np.zeros(n + 1, dtype=np.int64)
        checksums = np.zeros(n, dtype=np.uint32)
        with open(tmp / PNGS, "wb") as blob:
            for i, png in enumerate(pool.map(lambda i: encode_png(templates.crop(i), level), range(n))):
                blob.write(png)
                offsets[i + 1] = offsets[i] + len(png)
                checksums[i] = zlib.crc32(png)
        np.save(tmp / PNG_OFFSETS, offsets, allow_pickle=False)
        np.save(tmp / PNG_CHECKSUMS, checksums, allow_pickle=False)
        header = {"level": level, "count": n, "files": {PNG_OFFSETS: {"crc32": _crc(offsets)},
                                                         PNG_CHECKSUMS: {"crc32": _crc(checksums)}}}
        (tmp / HEADER).write_text(json.dumps(header, indent=1))
        _install(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_pngs(templates: PreparedTemplates, directory: Path, level: int) -> PngCrops | None:
    """The mapped PNGs in ``directory``, or None when they are missing, of another level or damaged."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        header = json.loads(_read_at(fd, HEADER))
        if header.get("level") != level or header.get("count") != templates.count:
            return None
        small = {}
        for name in (PNG_OFFSETS, PNG_CHECKSUMS):
            with _open_at(fd, name) as fh:
                small[name] = np.load(fh, allow_pickle=False)
            if _crc(small[name]) != header["files"][name]["crc32"]:
                return None
        offsets = small[PNG_OFFSETS]
        if offsets.shape != (templates.count + 1,) or small[PNG_CHECKSUMS].shape != (templates.count,):
            return None
        blob = _map_at(fd, PNGS, {"dtype": "uint8", "shape": [int(offsets[-1])]})
    except (OSError, KeyError, TypeError, ValueError):
        return None
    finally:
        os.close(fd)
    return PngCrops(blob, offsets, small[PNG_CHECKSUMS], templates, level, directory)


class _Parts:
    """The variable-size parts as templates are derived: boxes, regions, strips, JPEGs, checksums."""

    def __init__(self, n: int):
        self.boxes = np.zeros((n, 5), dtype=np.int32)
        self.regions = np.full((n, 8), NO_REGION, dtype=np.int32)
        self.border_offsets = np.zeros(n + 1, dtype=np.int64)
        self.jpeg_offsets = np.zeros(n + 1, dtype=np.int64)
        self.checksums = np.zeros((n, 3), dtype=np.uint32)
        self.strips: list[bytes] = []
        self.jpegs: list[bytes] = []
        self.frame_shape: tuple[int, int, int] = (0, 0, 3)

    def add(self, i: int, derived: Derived) -> tuple[bytes, bytes]:
        if i == 0:
            self.frame_shape = (int(derived.frame_shape[0]), int(derived.frame_shape[1]), 3)
        self.boxes[i] = derived.box
        self.regions[i] = _region_row(derived.region)
        strips = b"".join(np.ascontiguousarray(s).tobytes() for s in derived.strips)
        self.border_offsets[i + 1] = self.border_offsets[i] + len(strips)
        self.jpeg_offsets[i + 1] = self.jpeg_offsets[i] + len(derived.jpeg)
        self.checksums[i] = (_crc(derived.crop), zlib.crc32(strips), zlib.crc32(derived.jpeg))
        return strips, derived.jpeg

    def arrays(self) -> dict[str, Any]:
        return dict(boxes=self.boxes, regions=self.regions, border_offsets=self.border_offsets,
                    borders=np.frombuffer(b"".join(self.strips), dtype=np.uint8),
                    jpeg_offsets=self.jpeg_offsets, jpegs=np.frombuffer(b"".join(self.jpegs), dtype=np.uint8),
                    frame_shape=self.frame_shape)


def _derive_all(source: TemplateSource, boxes: np.ndarray, pool: Executor) -> Iterator[Derived]:
    """Every template derived on ``pool``, in order (decoding is most of it; OpenCV releases the GIL)."""
    return pool.map(lambda i: Derived(source.frame_bytes(i), boxes[i], i), range(len(boxes)))


def _split_strips(flat: np.ndarray, region: SpliceRegion, box: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """The four strips (top, bottom, left, right) RegionBorder keeps, as views of the flat bytes."""
    x1, y1, x2, y2 = box
    width = region.x1 - region.x0
    top, bottom, left, right = y1 - region.y0, y2 - region.y0, x1 - region.x0, x2 - region.x0
    rows = y2 - y1
    shapes = ((top, width), (region.y1 - region.y0 - bottom, width), (rows, left), (rows, width - right))
    strips, pos = [], 0
    for h, w in shapes:
        size = h * w * 3
        strips.append(flat[pos : pos + size].reshape(h, w, 3))
        pos += size
    return tuple(strips)


def write_prepared(package: PackageOnDisk, directory: Path, digest: str, pool: Executor) -> None:
    """Derive every template of ``package`` and write them to ``directory``, atomically (a temporary
    sibling renamed into place). Call under ``_preparing(directory)``."""
    boxes = np.asarray(package.crop_boxes(), dtype=np.int64)
    n = len(boxes)
    tmp = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}.partial")
    tmp.mkdir()
    try:
        crops = np.memmap(tmp / CROPS, dtype=np.uint8, mode="w+", shape=(n, *CROP_SHAPE))
        parts = _Parts(n)
        with open(tmp / BORDERS, "wb") as borders, open(tmp / JPEGS, "wb") as jpegs:
            for i, derived in enumerate(_derive_all(package, boxes, pool)):
                crops[i] = derived.crop
                strips, jpeg = parts.add(i, derived)
                borders.write(strips)
                jpegs.write(jpeg)
        crops.flush()
        del crops
        files: dict[str, Any] = {}
        for name, array in (("boxes.npy", parts.boxes), ("regions.npy", parts.regions),
                            ("border_offsets.npy", parts.border_offsets), ("jpeg_offsets.npy", parts.jpeg_offsets),
                            ("checksums.npy", parts.checksums)):
            np.save(tmp / name, array, allow_pickle=False)
            files[name] = {"crc32": _crc(array)}
        files[CROPS] = {"dtype": "uint8", "shape": [n, *CROP_SHAPE]}
        files[BORDERS] = {"dtype": "uint8", "shape": [int(parts.border_offsets[-1])]}
        files[JPEGS] = {"dtype": "uint8", "shape": [int(parts.jpeg_offsets[-1])]}
        manifest = package.manifest
        header = {"format": PREPARED_FORMAT, "format_version": PREPARED_VERSION,
                  "package": {"name": manifest.name, "version": manifest.version, "manifest_sha256": digest},
                  "count": n, "frame_shape": list(parts.frame_shape), "files": files}
        (tmp / HEADER).write_text(json.dumps(header, indent=1))  # last: a directory without it is not one
        _install(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, directory: Path) -> None:
    """Rename ``tmp`` into place; a stale or damaged directory there is moved aside first. Loads that
    mapped the old files keep them (their pages live until unmapped)."""
    if directory.exists():
        discard(directory)
    os.replace(tmp, directory)


def discard(directory: Path) -> bool:
    """Remove a directory of the store: renamed away first (atomic: no one opens it half-deleted), then
    deleted. False when it was not there."""
    old = directory.with_name(f".{directory.name.lstrip('.')}.{uuid.uuid4().hex}.old")
    try:
        os.replace(directory, old)
    except FileNotFoundError:
        return False
    shutil.rmtree(old, ignore_errors=True)
    return True


@contextmanager
def _preparing(directory: Path) -> Iterator[None]:
    """One preparation at a time per package, across processes (an advisory lock file beside it)."""
    lock = directory.with_name(f"{directory.name}.lock")
    with open(lock, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _try_open(cls: type[PreparedTemplates], directory: Path, package: PackageOnDisk,
              digest: str) -> PreparedTemplates | str:
    """``directory`` mapped for ``package``, or why it cannot be: its header's format version, the package's
    identity and hash, the count, every file's size and the small files' crc32 (the blocks are checked on
    use). One directory descriptor: every file comes from the same directory even if it is replaced meanwhile."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    try:
        header = json.loads(_read_at(fd, HEADER))
        if header.get("format") != PREPARED_FORMAT or header.get("format_version") != PREPARED_VERSION:
            return f"format {header.get('format')} {header.get('format_version')}, this pod writes {PREPARED_VERSION}"
        manifest = package.manifest
        if header["package"] != {"name": manifest.name, "version": manifest.version, "manifest_sha256": digest}:
            return "prepared for another package or version"
        if header["count"] != manifest.frame_count:
            return "another frame count"
        small = {}
        for name in SMALL_FILES:
            with _open_at(fd, name) as fh:
                small[name] = np.load(fh, allow_pickle=False)
            if _crc(small[name]) != header["files"][name]["crc32"]:
                return f"{name} is damaged"
        big = {}
        for name in (CROPS, BORDERS, JPEGS):
            spec = header["files"][name]
            big[name] = _map_at(fd, name, spec)
    except FileNotFoundError as exc:
        return f"missing {exc.filename or 'a file'}"
    except (KeyError, TypeError, ValueError, OSError) as exc:
        return f"unreadable or malformed ({exc!r})"
    finally:
        os.close(fd)
    return cls(boxes=small["boxes.npy"], regions=small["regions.npy"], border_offsets=small["border_offsets.npy"],
               borders=big[BORDERS], jpeg_offsets=small["jpeg_offsets.npy"], jpegs=big[JPEGS], crops=big[CROPS],
               frame_shape=tuple(header["frame_shape"]), checksums=small["checksums.npy"], source=package,
               directory=directory)


def _open_at(fd: int, name: str) -> Any:
    return open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb")


def _read_at(fd: int, name: str) -> bytes:
    with _open_at(fd, name) as fh:
        data: bytes = fh.read()
        return data


def _map_at(fd: int, name: str, spec: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(v) for v in spec["shape"])
    dtype = np.dtype(spec["dtype"])
    with _open_at(fd, name) as fh:  # the mapping keeps the file's pages after the descriptor closes
        if os.fstat(fh.fileno()).st_size != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{name} has the wrong size")
        if int(np.prod(shape)) == 0:
            return np.empty(shape, dtype=dtype)  # mmap refuses empty files
        return np.memmap(fh, dtype=dtype, mode="r", shape=shape)


def prepare_package(package: PackageOnDisk, workers: int | None = None) -> Path:
    """Prepare ``package``'s templates now (``lipsync package fetch``); returns the prepared directory."""
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                            thread_name_prefix="lipsync-prepare") as pool:
        prepared = PreparedTemplates.open_or_prepare(package, pool)
    if prepared.directory is None:
        raise PackageError(f"cannot prepare templates beside {package.root}")
    return prepared.directory

