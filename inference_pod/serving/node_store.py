"""The extracted store as several processes on one node share it (a node-local store: every pod on the node
mounts the same directory): leases on the copies in use, and garbage collection of what nobody uses.

A **lease** is a shared ``flock`` on ``.{copy}.lease`` beside an extracted copy, held by every process from
before it opens (or extracts) the copy until its model is unloaded; the kernel drops it when the process
dies, so a crashed pod never pins a copy. The lease file's mtime is the copy's last use.

**Garbage collection** (``collect_garbage``; a serving process runs it after each unload and every
``COLLECT_EVERY_S`` from its first load) removes only what it can prove unused:

- an extracted copy of an older version, when a newer version of the same character is in the store, the
  copy's lease can be taken exclusively (no process on the node holds it: this one's resident models hold
  theirs) and nothing about it was used or written for ``stale_after_s`` (which covers a pod between its
  init container's extraction and its server's first load, the one time a copy is wanted but unleased);
- prepared templates (``.{copy}.templates``) whose copy is gone, once no one prepares them (their lock) or
  leases the copy (an extraction in progress);
- a preparation's temporary directory once its lock is free (preparation holds it throughout), an
  extraction's once its copy is unleased and it has not been written for ``stale_after_s``;
- ``.old`` directories (renamed away to be deleted; one that is left means a crash mid-delete), and stamp
  or download temporaries not written for ``stale_after_s``.

Removal renames first and deletes after, while the exclusive locks are held, so a process that takes a lease
afterwards finds the copy either whole or absent (and extracts it again), never half-deleted. Processes that
mapped files of a removed directory keep their pages (an unlinked file lives until its last mapping goes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from inference_pod.core.prepared_templates import discard
from inference_pod.errors import LipSyncError
from inference_pod.package import MANIFEST, read_manifest
from inference_pod.serving.registry import version_key

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0  # a copy unused for an hour is old enough to go, if a newer version is there
COLLECT_EVERY_S = 600.0  # how often a serving process collects, besides after each unload

_HEX = r"[0-9a-f]{32}"
_TEMPLATES = re.compile(r"^\.(?P<copy>.+)\.templates$")
_TEMPLATES_LOCK = re.compile(r"^\.(?P<copy>.+)\.templates\.lock$")
_TEMPLATES_PARTIAL = re.compile(rf"^\.(?P<copy>.+)\.templates\.{_HEX}\.partial$")
_COPY_PARTIAL = re.compile(rf"^\.(?P<copy>.+)\.{_HEX}\.partial$")
_OLD = re.compile(rf"^\..+\.{_HEX}\.old$")
_STAMP = re.compile(r"^\.(?P<copy>.+)\.(?:source|checked)$")  # the zip it came from; members that passed
_STAMP_TMP = re.compile(rf"^\..+\.(?:source|checked)\.{_HEX}\.tmp$")
_LEASE = re.compile(r"^\.(?P<copy>.+)\.lease$")
_DOWNLOAD_PART = re.compile(rf"^\..+\.zip\.{_HEX}\.part$")


def lease_path(copy: Path) -> Path:
    return copy.parent / f".{copy.name}.lease"


def templates_dir(copy: Path) -> Path:
    """The prepared templates' directory (core/prepared_templates.py names it the same way)."""
    return copy.parent / f".{copy.name}.templates"


def _templates_lock(copy: Path) -> Path:
    return copy.parent / f".{copy.name}.templates.lock"


class CopyLease:
    """A shared lock on one extracted copy: while held, no process on the node removes the copy."""

    def __init__(self, copy: Path, fd: int | None):
        self.copy = copy
        self._fd = fd

    @classmethod
    def take(cls, copy: Path) -> CopyLease:
        """Blocks only while a collection is removing this copy (a rename). A store this process cannot
        write gets a lease that holds nothing: such a store is collected by no one that shares it."""
        path = lease_path(copy)
        while True:
            try:
                copy.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
                    return cls(copy, None)
                raise
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _same_file(fd, path):
                _touch(fd)
                return cls(copy, fd)
            os.close(fd)  # a collection removed that lease file while we waited: lock the new one

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.copy.exists():
                # Nothing to protect (an extraction failed): the lease file goes if no one else holds it.
                # Whoever waits for it finds another inode at its path and locks that instead.
                with suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _same_file(fd, lease_path(self.copy)):
                        lease_path(self.copy).unlink()
                return
            _touch(fd)  # the last use: a collection waits stale_after_s from here
        finally:
            os.close(fd)  # closing drops the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _touch(fd: int) -> None:
    with suppress(OSError):
        os.utime(fd)


@contextmanager
def _exclusive(path: Path, create: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` if no one holds it now (True), else False; never waits."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        yield True  # no lock file: no one holds it
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield _same_file(fd, path)
    finally:
        os.close(fd)


@dataclass
class Collected:
    """What a collection removed, by kind (paths), and what it kept because it is or may be in use."""

    removed: list[Path] = field(default_factory=list)
    kept_in_use: list[Path] = field(default_factory=list)

    @property
    def nothing(self) -> bool:
        return not self.removed


def _newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and everything under it (a directory's own mtime misses a file being
    written inside it)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _last_use(copy: Path) -> float:
    """When the copy was last leased, released, extracted or prepared."""
    times = [_newest_mtime(lease_path(copy))]
    for path in (copy, copy / MANIFEST, templates_dir(copy)):
        with suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times)


def _remove_dir(path: Path, removed: list[Path]) -> None:
    if discard(path):
        removed.append(path)


def _remove_file(path: Path, removed: list[Path]) -> None:
    with suppress(FileNotFoundError):
        path.unlink()
        removed.append(path)


# A copy's (name, version) by its manifest's (path, inode, mtime): a pool's store holds hundreds of
# characters, and their manifests (one line per frame) are read once, not at every collection.
_identities: dict[tuple[Path, int, int], tuple[str, str]] = {}


def _identity(copy: Path) -> tuple[str, str] | None:
    try:
        st = (copy / MANIFEST).stat()
    except OSError:
        return None
    key = (copy, st.st_ino, st.st_mtime_ns)
    known = _identities.get(key)  # collections may run in several threads at once: one lookup, no re-read
    if known is None:
        try:
            manifest = read_manifest(copy)
        except (LipSyncError, OSError):
            return None  # what we cannot read we do not judge
        if len(_identities) > 4096:
            _identities.clear()
        known = _identities[key] = (manifest.name, manifest.version)
    return known


def _superseded_copies(store_dir: Path) -> list[Path]:
    """Extracted copies with a newer version of the same character beside them."""
    by_name: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(store_dir.iterdir()):
        if path.name.startswith("."):
            continue
        identity = _identity(path)
        if identity is not None:
            by_name.setdefault(identity[0], []).append((identity[1], path))
    out: list[Path] = []
    for versions in by_name.values():
        versions.sort(key=lambda v: version_key(v[0]), reverse=True)
        out.extend(path for _, path in versions[1:])
    return out


def collect_garbage(store_dir: Path, models_dir: Path | None = None, *, stale_after_s: float = STALE_AFTER_S,
                    now: float | None = None) -> Collected:
    """Remove what no process on the node uses from an extracted store (and a models directory's abandoned
    downloads); see the module docstring for the rules. Never raises for a file it cannot remove."""
    store_dir = Path(store_dir)
    now = time.time() if now is None else now
    done = Collected()
    if not store_dir.is_dir():
        return done

    def stale(path: Path) -> bool:
        return now - _newest_mtime(path) >= stale_after_s

    for copy in _superseded_copies(store_dir):
        last_use, had_lease = _last_use(copy), lease_path(copy).exists()
        # Created if absent, so that a process taking a lease meanwhile waits for this decision.
        with _exclusive(lease_path(copy)) as free:
            if not free or now - last_use < stale_after_s:
                if not had_lease:  # a lease file made just now is no use of the copy
                    with suppress(OSError):
                        os.utime(lease_path(copy), (last_use, last_use))
                done.kept_in_use.append(copy)
                continue
            with _exclusive(_templates_lock(copy)) as not_preparing:
                if not not_preparing:
                    done.kept_in_use.append(copy)
                    continue
                _remove_dir(templates_dir(copy), done.removed)
                _remove_file(store_dir / f".{copy.name}.source", done.removed)
                _remove_file(store_dir / f".{copy.name}.checked", done.removed)
                _remove_dir(copy, done.removed)  # last: a copy that is gone has nothing left beside it
                _remove_file(_templates_lock(copy), done.removed)
                _remove_file(lease_path(copy), done.removed)  # lessees re-check the inode they locked

    for path in sorted(store_dir.iterdir()):
        name = path.name
        if not name.startswith(".") or not path.exists():
            continue
        if _OLD.match(name):
            shutil.rmtree(path, ignore_errors=True)  # another process deleting it too is harmless
            done.removed.append(path)
        elif m := _TEMPLATES_PARTIAL.match(name):
            with _exclusive(_templates_lock(store_dir / m["copy"]), create=False) as not_preparing:
                if not_preparing:
                    _remove_dir(path, done.removed)
                else:
                    done.kept_in_use.append(path)
        elif m := _TEMPLATES.match(name):
            copy = store_dir / m["copy"]
            if copy.is_dir():
                continue
            with _exclusive(lease_path(copy), create=False) as unleased, \
                    _exclusive(_templates_lock(copy), create=False) as not_preparing:
                if unleased and not_preparing:
                    _remove_dir(path, done.removed)
                    _remove_file(_templates_lock(copy), done.removed)
                else:
                    done.kept_in_use.append(path)
        elif m := _COPY_PARTIAL.match(name):
            with _exclusive(lease_path(store_dir / m["copy"]), create=False) as unleased:
                if unleased and stale(path):
                    shutil.rmtree(path, ignore_errors=True)
                    done.removed.append(path)
                else:
                    done.kept_in_use.append(path)
        elif _STAMP_TMP.match(name):
            if stale(path):
                _remove_file(path, done.removed)
        elif (m := _STAMP.match(name) or _LEASE.match(name)) and not (store_dir / m["copy"]).exists():
            with _exclusive(lease_path(store_dir / m["copy"]), create=False) as unleased:
                if unleased and stale(path):
                    _remove_file(path, done.removed)
        elif (m := _TEMPLATES_LOCK.match(name)) and not (store_dir / m["copy"]).exists() \
                and not templates_dir(store_dir / m["copy"]).exists():
            with _exclusive(path, create=False) as not_preparing, \
                    _exclusive(lease_path(store_dir / m["copy"]), create=False) as unleased:
                if not_preparing and unleased and stale(path):
                    _remove_file(path, done.removed)

    if models_dir is not None and Path(models_dir).is_dir():
        for path in sorted(Path(models_dir).iterdir()):
            if _DOWNLOAD_PART.match(path.name) and stale(path):
                _remove_file(path, done.removed)
    if done.removed:
        log.info("store %s: removed %d stale entries (%s)", store_dir, len(done.removed),
                 ", ".join(p.name for p in done.removed[:5]) + (", ..." if len(done.removed) > 5 else ""))
    return done
