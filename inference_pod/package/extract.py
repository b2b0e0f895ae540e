"""Reading untrusted package zips: safe member paths, limits on declared and inflated sizes, streamed
checksums, contents checked in a temporary sibling, and one atomic rename into place."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from inference_pod.errors import PackageError, StorageFull, is_disk_full
from inference_pod.package.character import CharacterPackage
from inference_pod.package.checks import validate_contents
from inference_pod.package.manifest import LAYOUT_DIRS, MANIFEST, Manifest, error_context

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class PackageLimits:
    """Caps applied to untrusted packages; the defaults fit an hour of 1080p frames and width-32 weights."""

    max_member_bytes: int = 1 << 30
    max_total_bytes: int = 16 << 30
    max_members: int = 200_000
    max_manifest_bytes: int = 64 << 20  # a manifest of max_members frames is about 25 MB of JSON


def read_manifest(path, limits: PackageLimits = PackageLimits()) -> Manifest:
    """The checked manifest of a package zip or extracted directory, without extracting anything."""
    path = Path(path)
    with error_context(str(path)):
        if path.is_dir():
            return Manifest.from_json(_read_file_limited(path / MANIFEST, limits.max_manifest_bytes))
        return _zip_manifest(path, limits)[1]


def extract_package(zip_path, dest_dir, limits: PackageLimits = PackageLimits()) -> CharacterPackage:
    """Extract and check a package into ``dest_dir``, atomically; reuse ``dest_dir`` if it holds the same one."""
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    with error_context(str(zip_path)), _open_zip(zip_path) as zf:
        entries = _checked_entries(zf, limits)
        manifest_bytes = _read_zip_manifest(zf, entries, limits)
        manifest = Manifest.from_json(manifest_bytes)
        _check_entries_match(entries, manifest)
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        if _holds(dest_dir, digest, manifest):
            _check_source(zip_path, zf, entries, manifest, dest_dir, limits)
            return CharacterPackage(dest_dir, manifest)

        tmp = dest_dir.with_name(f".{dest_dir.name}.{uuid.uuid4().hex}.partial")
        try:
            dest_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            total = 0
            for member, expected in sorted(manifest.members.items()):
                total += _extract_member(zf, entries[member], tmp / member, expected, limits, total)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            validate_contents(tmp, manifest, tensors=True, decode_frames=False)
            _install(tmp, dest_dir, digest, manifest)
            _write_stamp(zip_path, dest_dir)
            _write_checked(dest_dir, {"manifest": digest, "members": _check_sizes(dest_dir, manifest)})
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # The partial copy goes (below); what is left to say is where the space ran out.
            raise StorageFull(f"no space left on device extracting {zip_path.name} into {dest_dir.parent} "
                              f"({exc.strerror})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CharacterPackage(dest_dir, manifest)


def check_extracted_source(zip_path, dest_dir, limits: PackageLimits = PackageLimits()) -> str | None:
    """Whether the zip an extracted copy came from is still intact; the problem, logged as a warning, or None.

    An extracted copy was fully checked when it was made, so it is served even when its zip has been damaged
    since (same manifest, different member bytes): what is served is right. But the zip is what the next pod
    or a re-extraction uses, so its damage is reported. The zip is re-read only when its size or time differs
    from the stamp written at extraction (``.{copy}.source`` beside the copy), so an unchanged zip costs a stat.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    try:
        with _open_zip(zip_path) as zf:
            entries = _checked_entries(zf, limits)
            manifest = Manifest.from_json(_read_zip_manifest(zf, entries, limits))
            _check_entries_match(entries, manifest)
            return _check_source(zip_path, zf, entries, manifest, dest_dir, limits)
    except PackageError as exc:
        return _warn_damaged(zip_path, dest_dir, str(exc))


def _check_source(zip_path: Path, zf: zipfile.ZipFile, entries: Mapping[str, zipfile.ZipInfo], manifest: Manifest,
                  dest_dir: Path, limits: PackageLimits) -> str | None:
    if _read_stamp(dest_dir) == _zip_stamp(zip_path):
        return None
    try:
        for member, expected in sorted(manifest.members.items()):
            _, digest = _copy_member(zf, entries[member], _Discard(), min(int(expected["size"]), limits.max_member_bytes))
            if digest != expected["sha256"]:
                raise PackageError(f"sha256 mismatch for {member}")
    except PackageError as exc:
        return _warn_damaged(zip_path, dest_dir, str(exc))
    _write_stamp(zip_path, dest_dir)
    return None


def _warn_damaged(zip_path: Path, dest_dir: Path, problem: str) -> str:
    message = (f"{zip_path} is damaged ({problem}); serving {dest_dir}, which was checked when it was extracted "
               "from it: replace the zip")
    log.warning("%s", message)
    return message


class _Sink(Protocol):
    """Where a member's bytes go: an open file, or _Discard when only its digest is wanted."""

    def write(self, data: bytes, /) -> object: ...


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _stamp_path(dest_dir: Path) -> Path:
    return dest_dir.with_name(f".{dest_dir.name}.source")


def _zip_stamp(zip_path: Path) -> dict | None:
    try:
        st = zip_path.stat()
    except OSError:
        return None
    return {"zip": str(zip_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_stamp(dest_dir: Path) -> dict | None:
    return _read_json(_stamp_path(dest_dir))


def _write_stamp(zip_path: Path, dest_dir: Path) -> None:
    _write_json(_stamp_path(dest_dir), _zip_stamp(zip_path))  # read-only store: the zip is re-read next time


def _read_json(path: Path) -> dict | None:
    """A stamp beside a copy, or None when it is absent or unreadable (as if never written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict | None) -> None:
    """A stamp written atomically; on a read-only or full store none is written, and the work is redone."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def open_package(path, cache_dir=None, limits: PackageLimits = PackageLimits()) -> CharacterPackage:
    """A package from a zip (extracted under ``cache_dir``, reused when already there) or an extracted dir.

    Directories are checked for structure (members present with their sizes, frame headers, crop boxes,
    arrays); ``verify_package`` also hashes every member and decodes every frame.
    """
    path = Path(path)
    if path.is_dir():
        with error_context(str(path)):
            manifest_bytes = _read_file_limited(path / MANIFEST, limits.max_manifest_bytes)
            manifest = Manifest.from_json(manifest_bytes)
            fingerprint = _check_sizes(path, manifest)
            checked = {"manifest": hashlib.sha256(manifest_bytes).hexdigest(), "members": fingerprint}
            # Frame headers are what costs here (a file opened per template): skipped when every member is
            # still the very file (inode, size, ctime) that passed them last time.
            unchanged = _read_checked(path) == checked
            validate_contents(path, manifest, tensors=False, decode_frames=False, frame_headers=not unchanged)
            if not unchanged:
                _write_checked(path, checked)
        return CharacterPackage(path, manifest)
    with error_context(str(path)):
        manifest_bytes, manifest = _zip_manifest(path, limits)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return extract_package(path, cache / f"{manifest.name}-{manifest.version}-{digest[:16]}", limits)


def verify_package(path, limits: PackageLimits = PackageLimits()) -> Manifest:
    """The full check: layout, limits, every checksum, every frame decoded, crop boxes, arrays, tensor shapes."""
    path = Path(path)
    if not path.is_dir():
        with tempfile.TemporaryDirectory(prefix="lipsync-verify-") as tmp:
            package = extract_package(path, Path(tmp) / "package", limits)
            with error_context(str(path)):
                validate_contents(package.root, package.manifest, tensors=False, decode_frames=True)
            return package.manifest
    manifest = read_manifest(path, limits)
    with error_context(str(path)):
        _check_sizes(path, manifest)
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
        unlisted = sorted(present - set(manifest.members) - {MANIFEST})
        if unlisted:
            raise PackageError(f"unlisted file {unlisted[0]} in the package directory")
        for member, expected in sorted(manifest.members.items()):
            digest = _file_sha256(path / member)
            if digest != expected["sha256"]:
                raise PackageError(f"sha256 mismatch for {member}: manifest {expected['sha256']}, file {digest}")
        validate_contents(path, manifest, tensors=True, decode_frames=True)
    return manifest


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lipsync" / "packages"


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    if not path.exists():
        raise PackageError(f"no such package file: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise PackageError(f"not a zip file ({exc})") from None
    with zf:
        yield zf


def _zip_manifest(path: Path, limits: PackageLimits) -> tuple[bytes, Manifest]:
    """The manifest, bounded by what the zip holds: its members are the zip's, each its declared size."""
    with _open_zip(path) as zf:
        entries = _checked_entries(zf, limits)
        data = _read_zip_manifest(zf, entries, limits)
    manifest = Manifest.from_json(data)
    _check_entries_match(entries, manifest)
    return data, manifest


def _checked_entries(zf: zipfile.ZipFile, limits: PackageLimits) -> dict[str, zipfile.ZipInfo]:
    """Every entry is a safe, unique, plain file under the limits (declared sizes); returns files by name."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise PackageError(f"too many members: {len(infos)}, the limit is {limits.max_members}")
    entries: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        _check_member_path(name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise PackageError(f"member {name!r} is a symbolic link")
        if info.is_dir():
            if name not in LAYOUT_DIRS:
                raise PackageError(f"unknown directory entry {name!r}")
            continue
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # many writers leave the type bits at 0
            raise PackageError(f"member {name!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise PackageError(f"member {name!r} is encrypted")
        if name in entries:
            raise PackageError(f"member {name!r} appears twice")
        if info.file_size > limits.max_member_bytes:
            raise PackageError(f"member {name} declares {info.file_size} bytes, over the limit of {limits.max_member_bytes}")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise PackageError(f"members declare more than the limit of {limits.max_total_bytes} bytes in all")
        entries[name] = info
    return entries


def _check_member_path(name: str) -> None:
    """Refuse anything that could land outside the target directory, on any platform."""
    parts = name.rstrip("/").split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or re.match(r"^[A-Za-z]:", name)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise PackageError(f"unsafe member path {name!r}")


def _read_zip_manifest(zf: zipfile.ZipFile, entries: Mapping[str, zipfile.ZipInfo], limits: PackageLimits) -> bytes:
    if MANIFEST not in entries:
        raise PackageError(f"missing member {MANIFEST}")
    buf = io.BytesIO()
    _copy_member(zf, entries[MANIFEST], buf, min(limits.max_member_bytes, limits.max_manifest_bytes))
    return buf.getvalue()


def _check_entries_match(entries: Mapping[str, zipfile.ZipInfo], manifest: Manifest) -> None:
    for member, expected in sorted(manifest.members.items()):
        if member not in entries:
            raise PackageError(f"missing member {member}")
        if entries[member].file_size != expected["size"]:
            raise PackageError(
                f"size mismatch for {member}: manifest {expected['size']} bytes, zip {entries[member].file_size}"
            )
    unlisted = sorted(set(entries) - set(manifest.members) - {MANIFEST})
    if unlisted:
        raise PackageError(f"member {unlisted[0]} is not listed in {MANIFEST}")


def _extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, expected: Mapping[str, Any], limits: PackageLimits, total: int
) -> int:
    """Stream one member to disk, hashing and counting; returns its size. Declared sizes are not trusted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    limit = min(int(expected["size"]), limits.max_member_bytes, limits.max_total_bytes - total)
    with open(target, "xb") as out:
        size, digest = _copy_member(zf, info, out, limit)
    if size != expected["size"]:
        raise PackageError(f"size mismatch for {info.filename}: manifest {expected['size']} bytes, inflated {size}")
    if digest != expected["sha256"]:
        raise PackageError(f"sha256 mismatch for {info.filename}: manifest {expected['sha256']}, content {digest}")
    return size


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: _Sink, limit: int) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PackageError(f"member {info.filename} inflates past {limit} bytes (declared {info.file_size})")
                sha.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise PackageError(f"member {info.filename} is corrupt: {exc}") from None
    return size, sha.hexdigest()


def _read_file_limited(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise PackageError(f"missing member {MANIFEST}") from None
    if len(data) > limit:
        raise PackageError(f"{MANIFEST} is larger than the limit of {limit} bytes")
    return data


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _check_sizes(root: Path, manifest: Manifest) -> str:
    """Every member present as a plain file of its manifest size; returns a digest of the members' identities
    (inode, size, ctime: a rewrite or replacement changes it, and ctime cannot be set back)."""
    identity = hashlib.sha256()
    base = os.fspath(root)
    for member, expected in sorted(manifest.members.items()):
        try:
            st = os.lstat(os.path.join(base, member))  # one call per member: thousands of frames
        except OSError:
            raise PackageError(f"missing member {member}") from None
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"missing member {member}")
        if st.st_size != expected["size"]:
            raise PackageError(f"size mismatch for {member}: manifest {expected['size']} bytes, file {st.st_size}")
        identity.update(f"{member}\0{st.st_ino}\0{st.st_size}\0{st.st_ctime_ns}\n".encode())
    return identity.hexdigest()


def _checked_path(root: Path) -> Path:
    return root.with_name(f".{root.name}.checked")


def _read_checked(root: Path) -> dict | None:
    return _read_json(_checked_path(root))


def _write_checked(root: Path, checked: dict) -> None:
    """Remember that ``root``'s members passed the structural checks (a read-only store just rechecks)."""
    _write_json(_checked_path(root), checked)


def _holds(root: Path, manifest_digest: str, manifest: Manifest) -> bool:
    """Whether ``root`` is already this package, extracted: same manifest bytes, every member its size."""
    try:
        if hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest() != manifest_digest:
            return False
        _check_sizes(root, manifest)
    except (OSError, PackageError):
        return False
    return True


def _install(tmp: Path, dest: Path, digest: str, manifest: Manifest) -> None:
    """Rename the checked ``tmp`` to ``dest``; a different package already there is replaced."""
    try:
        os.replace(tmp, dest)  # atomic; succeeds when dest is absent or an empty directory
        return
    except OSError:
        if not dest.exists():
            raise
    if _holds(dest, digest, manifest):  # a concurrent extraction of the same package won the race
        return
    if not (dest / MANIFEST).is_file():  # never delete a directory we did not make
        raise PackageError(f"{dest} exists and is not an extracted package; refusing to replace it")
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(old, ignore_errors=True)
