"""Is the package a LipSyncModel asks for available? Checked against the registry's index before a rollout.

A registry is a directory served over HTTP(S) with ``index.json``::

    {"packages": [{"name", "version", "size", "sha256", "url"}, ...]}

``url`` is relative to the index or absolute. The operator resolves the spec to one entry (the newest
version when none is pinned), confirms the file is there, and hands name, version and sha256 to the pod's
init container, so every pod of a rollout runs exactly the same bytes.

Every request goes through the operator's registry policy (lipsync_operator.egress): the index, the package
file the index points at, and any redirect. A refused URL is reported (reason RegistryRefused), never opened.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

# The pod's own index reader: standard library only, copied into the operator image beside this package.
from inference_pod.registry_index import INDEX_NAME, MAX_INDEX_BYTES, InvalidIndex, parse_index, version_key
from lipsync_operator.egress import RefusedURL, RegistryPolicy, refusal

USER_AGENT = "lipsync-operator"


@dataclass(frozen=True)
class PackageCheck:
    available: bool
    reason: str
    message: str
    name: str
    version: str = ""
    sha256: str = ""
    size: int = 0
    url: str = ""
    registry: str = ""

    def status(self) -> dict:
        """The ``status.package`` block (only for an available package)."""
        return {k: v for k, v in asdict(self).items() if k in ("name", "version", "sha256", "size", "url", "registry")}


class _Failure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class _Fetcher:
    policy: RegistryPolicy
    token: str | None
    timeout: float

    def open(self, url: str, method: str) -> Any:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, */*"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            return self.policy.open(url, method=method, headers=headers, timeout=self.timeout)
        except (RefusedURL, urllib.error.URLError) as exc:
            refused = refusal(exc)
            if refused:
                raise _Failure("RegistryRefused", refused) from None
            raise


def _read_index(registry: str, fetch: _Fetcher) -> list[dict]:
    url = urllib.parse.urljoin(registry, INDEX_NAME)
    try:
        with fetch.open(url, "GET") as response:
            data = response.read(MAX_INDEX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise _Failure("IndexNotFound", f"{url} answered 404: no registry index there") from None
        if exc.code in (401, 403):
            raise _Failure("RegistryForbidden", f"{url} answered {exc.code}: check package.pullSecret") from None
        raise _Failure("RegistryError", f"{url} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Failure("RegistryUnreachable", f"cannot reach {url}: {reason}") from None
    try:
        entries = parse_index(data, url)
    except InvalidIndex as exc:
        raise _Failure("InvalidIndex", str(exc)) from None
    return [entry.to_dict() | {"url": urllib.parse.urljoin(url, entry.url)} for entry in entries]


def _confirm_file(entry: dict, fetch: _Fetcher) -> None:
    """HEAD the package file: an index may list a file that was never uploaded or has been removed."""
    try:
        with fetch.open(entry["url"], "HEAD") as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as exc:
        if exc.code in (405, 501):   # servers without HEAD: the init container's download will tell
            return
        if exc.code == 404:
            raise _Failure("PackageFileMissing", f"the index lists {entry['url']} but it answered 404") from None
        raise _Failure("RegistryError", f"{entry['url']} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Failure("RegistryUnreachable", f"cannot reach {entry['url']}: {getattr(exc, 'reason', exc)}") from None
    if length is not None and length.isdigit() and int(length) != entry["size"]:
        raise _Failure("SizeMismatch", f"{entry['url']} is {length} bytes, the index says {entry['size']}")


def _enclosing_dirs(uri: str) -> list[str]:
    """http://h/a/b/x.zip -> [http://h/a/b/, http://h/a/, http://h/]"""
    parts = urllib.parse.urlsplit(uri)
    segments = parts.path.split("/")[:-1]
    dirs = []
    while segments:
        path = "/".join(segments) + "/"
        dirs.append(urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")))
        segments.pop()
    return dirs


def check_package(package: dict, *, default_registry: str, policy: RegistryPolicy, token: str | None = None,
                  timeout: float = 5.0) -> PackageCheck:
    """Resolve ``spec.package`` against its registry, fetching only what ``policy`` allows; never raises for
    registry trouble, reports it."""
    fetch = _Fetcher(policy, token, timeout)
    name = package["name"]
    pinned = package.get("version") or ""
    want_sha = (package.get("sha256") or "").lower()
    registry = ""
    try:
        if package.get("uri"):
            uri = package["uri"]
            entry = None
            for candidate in _enclosing_dirs(uri):
                try:
                    entries = _read_index(candidate, fetch)
                except _Failure as failure:
                    if failure.reason in ("IndexNotFound", "RegistryForbidden", "RegistryRefused"):
                        continue
                    raise
                matches = [e for e in entries if e["url"] == uri]
                if matches:
                    registry, entry = candidate, matches[0]
                    break
            if entry is None:
                raise _Failure("PackageNotFound", f"no index.json in a directory enclosing {uri} lists it")
            if entry["name"] != name:
                raise _Failure("PackageNotFound", f"{uri} is package {entry['name']!r}, not {name!r}")
            if pinned and entry["version"] != pinned:
                raise _Failure("VersionNotFound", f"{uri} is version {entry['version']}, not {pinned}")
        else:
            registry = package.get("registry") or default_registry
            if not registry:
                raise _Failure("NoRegistry", "neither package.registry nor an operator-wide registry is set")
            registry = registry if registry.endswith("/") else registry + "/"
            entries = [e for e in _read_index(registry, fetch) if e["name"] == name]
            if not entries:
                raise _Failure("PackageNotFound", f"{registry}{INDEX_NAME} lists no package {name!r}")
            if pinned:
                entries = [e for e in entries if e["version"] == pinned]
                if not entries:
                    raise _Failure("VersionNotFound", f"{registry}{INDEX_NAME} lists {name} but not version {pinned}")
            entry = max(entries, key=lambda e: version_key(e["version"]))
        if want_sha and entry["sha256"] != want_sha:
            raise _Failure("ChecksumMismatch",
                           f"{name} {entry['version']} has sha256 {entry['sha256']}, the spec expects {want_sha}")
        _confirm_file(entry, fetch)
    except _Failure as failure:
        return PackageCheck(False, failure.reason, failure.message, name=name, version=pinned, registry=registry)
    return PackageCheck(True, "Verified",
                        f"{name} {entry['version']} ({entry['size']} bytes) is listed in {registry}{INDEX_NAME}",
                        name=name, version=entry["version"], sha256=entry["sha256"], size=entry["size"],
                        url=entry["url"], registry=registry)
