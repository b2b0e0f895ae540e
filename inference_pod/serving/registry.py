"""The model registry: a static directory any web server or bucket can host.

Layout::

    index.json                         {"packages": [{"name", "version", "size", "sha256", "url"}, ...]}
    {name}/{version}/{name}-{version}.zip

``url`` is relative to index.json unless the registry was published with a base URL. Publishing and
downloading are both atomic: a reader never sees a half-written index or package, and a failed or
corrupt download leaves nothing behind. Downloads retry connection errors and 5xx responses with
exponential backoff, then fail with a clear ``Unavailable``; a file that does not match its index entry
fails with ``PackageError``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from inference_pod import __version__, registry_index
from inference_pod.errors import (
    InvalidInput,
    ModelNotFound,
    PackageError,
    StorageFull,
    Unavailable,
    is_disk_full,
)
from inference_pod.registry_index import INDEX_NAME, MAX_INDEX_BYTES, IndexEntry, latest, version_key

T = TypeVar("T")
log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = f"lipsync-serving/{__version__}"


# One reader for the pod and the operator (inference_pod/registry_index.py); an entry is a RegistryEntry here.
RegistryEntry = IndexEntry


# ------------------------------------------------------------------------------------------ publishing


def publish(package_zip: Path, registry_dir: Path, base_url: str | None = None) -> RegistryEntry:
    """Add a package zip to a registry directory (created if needed) and return its index entry.

    Republishing the same bytes is a no-op; a different package under an existing name and version is
    refused, because pods and caches key everything on (name, version).
    """
    from inference_pod.package import verify_package

    package_zip, registry_dir = Path(package_zip), Path(registry_dir)
    manifest = verify_package(package_zip)  # only complete, valid packages go into a registry
    name, version = manifest.name, manifest.version
    relative = f"{name}/{version}/{name}-{version}.zip"
    url = f"{base_url.rstrip('/')}/{relative}" if base_url else relative
    registry_dir.mkdir(parents=True, exist_ok=True)
    sha = _file_sha256(package_zip)
    with _index_lock(registry_dir):
        entries = _read_local_index(registry_dir)
        existing = next((e for e in entries if (e.name, e.version) == (name, version)), None)
        if existing is not None and existing.sha256 != sha:
            raise PackageError(
                f"{name} {version} is already in the registry with different contents (sha256 "
                f"{existing.sha256[:12]}...); publish it under a new version")
        size, copied_sha = _copy_atomic(package_zip, registry_dir / relative)
        if copied_sha != sha:
            raise PackageError(f"{package_zip} changed while it was being published")
        entry = RegistryEntry(name=name, version=version, size=size, sha256=sha, url=url)
        entries = [e for e in entries if (e.name, e.version) != (name, version)] + [entry]
        entries.sort(key=lambda e: (e.name, version_key(e.version)))
        _write_atomic(registry_dir / INDEX_NAME,
                      (json.dumps({"packages": [e.to_dict() for e in entries]}, indent=1) + "\n").encode())
    log.info("published %s %s to %s", name, version, registry_dir)
    return entry


class _index_lock:
    """An exclusive lock on the registry directory, so concurrent publishes cannot lose entries."""

    def __init__(self, registry_dir: Path):
        self._path = registry_dir / ".index.lock"

    def __enter__(self) -> _index_lock:
        self._fh = open(self._path, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def _read_local_index(registry_dir: Path) -> list[RegistryEntry]:
    path = registry_dir / INDEX_NAME
    if not path.exists():
        return []
    return parse_index(path.read_bytes(), str(path))


def parse_index(data: bytes, where: str) -> list[RegistryEntry]:
    """The index's entries; an unusable index is the registry's problem: Unavailable."""
    try:
        return registry_index.parse_index(data, where)
    except registry_index.InvalidIndex as exc:
        raise Unavailable(str(exc)) from None


def _copy_atomic(src: Path, dest: Path) -> tuple[int, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    sha, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, sha.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ fetching


class _Retryable(Exception):
    """A failure worth another try: connection trouble, a 5xx/429, a truncated body."""


class RegistryClient:
    """Reads a registry over http(s):// or file://. Thread-safe; the index is cached for ``index_ttl_s``.

    ``url`` is the registry's base (index.json is appended) or the index file itself (ends in .json).
    """

    def __init__(self, url: str, *, timeout_s: float = 15.0, retries: int = 3, backoff_s: float = 0.25,
                 max_backoff_s: float = 5.0, index_ttl_s: float = 0.0, failure_ttl_s: float = 0.0,
                 token: str | None = None, sleep: Callable[[float], None] = time.sleep):
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise InvalidInput(f"registry URL must be http://, https:// or file://, got {url!r}")
        self.url = url
        self.index_url = url if url.rstrip("/").endswith(".json") else url.rstrip("/") + "/" + INDEX_NAME
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.index_ttl_s = index_ttl_s
        self.failure_ttl_s = failure_ttl_s
        # Private registries (a bucket behind a token, an artifact server) take a bearer token.
        self._headers = {"User-Agent": USER_AGENT} | ({"Authorization": f"Bearer {token}"} if token else {})
        self._sleep = sleep
        self._lock = threading.Lock()
        self._index: tuple[float, list[RegistryEntry]] | None = None
        self._failure: tuple[float, Unavailable] | None = None

    # -------------------------------------------------------------------------------------- index

    def list(self, refresh: bool = False) -> list[RegistryEntry]:
        """Every package in the index. Retries, then raises Unavailable."""
        now = time.monotonic()
        with self._lock:
            if not refresh and self._index and now - self._index[0] < self.index_ttl_s:
                return list(self._index[1])
            # A registry that just failed fails fast for a moment, instead of every caller retrying again.
            if not refresh and self._failure and now - self._failure[0] < self.failure_ttl_s:
                raise self._failure[1]
        try:
            entries = parse_index(self._with_retries(self.index_url, self._read_index), self.index_url)
        except Unavailable as exc:
            with self._lock:
                self._failure = (time.monotonic(), exc)
            raise
        with self._lock:
            self._index = (time.monotonic(), entries)
            self._failure = None
        return list(entries)

    def resolve(self, name: str, version: str | None = None) -> RegistryEntry:
        candidates = [e for e in self.list() if e.name == name]
        if version:
            candidates = [e for e in candidates if e.version == version]
        if not candidates:
            what = f"{name} {version}" if version else name
            raise ModelNotFound(f"model {what!r} is not in the registry at {self.url}")
        return latest(candidates)

    def package_url(self, entry: RegistryEntry) -> str:
        return urllib.parse.urljoin(self.index_url, entry.url)

    # -------------------------------------------------------------------------------------- download

    def fetch(self, name: str, version: str | None, dest_dir: Path, expected_sha256: str | None = None) -> Path:
        return self.download(self.resolve(name, version), dest_dir, expected_sha256)

    def download(self, entry: RegistryEntry, dest_dir: Path, expected_sha256: str | None = None) -> Path:
        """Stream the package to a temp file in ``dest_dir``, verify size and sha256, rename into place."""
        expected = (expected_sha256 or entry.sha256).lower()
        if expected != entry.sha256:
            raise PackageError(f"{entry.name} {entry.version}: the registry lists sha256 {entry.sha256}, "
                               f"expected {expected}")
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{entry.name}-{entry.version}.zip"
        if dest.exists() and dest.stat().st_size == entry.size and _file_sha256(dest) == expected:
            return dest  # already downloaded and intact
        url = self.package_url(entry)
        started = time.monotonic()
        self._with_retries(url, lambda: self._download_once(url, entry, dest))
        log.info("downloaded %s %s (%d bytes) in %.2fs from %s", entry.name, entry.version, entry.size,
                 time.monotonic() - started, url)
        return dest

    def _download_once(self, url: str, entry: RegistryEntry, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            sha, size = hashlib.sha256(), 0
            with self._open(url) as response, open(tmp, "wb") as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as exc:  # connection dropped mid-body
                        raise _Retryable(f"download interrupted after {size} bytes: {exc}") from None
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > entry.size:
                        raise PackageError(f"{url}: the registry serves more than the {entry.size} bytes its "
                                           f"index lists for {entry.name} {entry.version}")
                    sha.update(chunk)
                    out.write(chunk)  # a full disk is not the registry's fault: not retried (below)
                out.flush()
                os.fsync(out.fileno())
            if size != entry.size:
                raise _Retryable(f"truncated download: {size} of {entry.size} bytes")
            digest = sha.hexdigest()
            if digest != entry.sha256:
                raise PackageError(f"sha256 mismatch for {entry.name} {entry.version} from {url}: index lists "
                                   f"{entry.sha256}, downloaded {digest}")
            os.replace(tmp, dest)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise StorageFull(f"no space left on device downloading {entry.name} {entry.version} "
                              f"({entry.size} bytes) into {dest.parent} ({exc.strerror})") from None
        finally:
            tmp.unlink(missing_ok=True)

    # -------------------------------------------------------------------------------------- transport

    def _read_index(self) -> bytes:
        with self._open(self.index_url) as response:
            try:
                data = response.read(MAX_INDEX_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(f"reading the index failed: {exc}") from None
        if len(data) > MAX_INDEX_BYTES:
            raise Unavailable(f"registry index {self.index_url} is larger than {MAX_INDEX_BYTES} bytes")
        return data

    def _open(self, url: str) -> http.client.HTTPResponse:
        request = urllib.request.Request(url, headers=self._headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
            if exc.code in (401, 403):
                raise Unavailable(f"registry refused {url}: HTTP {exc.code} {exc.reason} "
                                  "(set the registry token: --registry-token / LIPSYNC_REGISTRY_TOKEN)") from None
            raise Unavailable(f"registry request {url} failed: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, OSError) and reason.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
                raise Unavailable(f"registry file {url} cannot be read: {reason}") from None  # file://, final
            raise _Retryable(str(reason)) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, bad status lines
            raise _Retryable(str(exc) or type(exc).__name__) from None

    def _with_retries(self, url: str, attempt: Callable[[], T]) -> T:
        delay = self.backoff_s
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Retryable as exc:
                if n == self.retries:
                    raise Unavailable(
                        f"registry unreachable: {url} failed {self.retries + 1} times, last error: {exc}") from None
                log.warning("registry %s: %s; retrying in %.2fs", url, exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")


def fetch(registry_url: str, name: str, version: str | None, dest_dir: Path,
          expected_sha256: str | None = None, token: str | None = None) -> Path:
    """Download ``name`` (its newest version when ``version`` is None) into ``dest_dir/{name}-{version}.zip``."""
    return RegistryClient(registry_url, token=token).fetch(name, version, Path(dest_dir), expected_sha256)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_url(path: Path) -> str:
    """A file:// URL for a local registry directory."""
    return Path(path).resolve().as_uri()


__all__ = ["INDEX_NAME", "RegistryClient", "RegistryEntry", "fetch", "file_url", "latest", "parse_index",
           "publish", "version_key"]
