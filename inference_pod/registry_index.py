"""The registry index, read one way by the pod and the operator: ``{"packages": [{name, version, size, sha256,
url}, ...]}``. Standard library only, so the operator's image (no torch, no numpy) imports it as it is.

Names and versions become file names, Kubernetes-style identifiers and cache keys: an entry whose name or
version is not a plain identifier makes the whole index invalid, for both readers (one hostile entry is a
registry to fix, not to half-trust).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

INDEX_NAME = "index.json"
MAX_INDEX_BYTES = 64 << 20
# 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit.
IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
IDENTIFIER_RULE = "1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"


class InvalidIndex(ValueError):
    """The index cannot be used as a whole; the message says where and why."""


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    size: int
    sha256: str
    url: str  # as written in the index: relative to it, or absolute

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: object, where: str = INDEX_NAME) -> IndexEntry:
        if not isinstance(obj, dict):
            raise InvalidIndex(f"registry index {where} has an entry that is not an object: {_short(obj)}")
        try:
            entry = cls(name=obj["name"], version=obj["version"], size=obj["size"],
                        sha256=str(obj["sha256"]).lower(), url=obj["url"])
        except KeyError as exc:
            raise InvalidIndex(f"registry index {where} has an entry without {exc}: {_short(obj)}") from None
        if not (is_identifier(entry.name) and is_identifier(entry.version)):
            raise InvalidIndex(f"registry index {where} has an invalid name or version: {_short(entry.name)} "
                               f"{_short(entry.version)} (names and versions are {IDENTIFIER_RULE})")
        if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size < 0:
            raise InvalidIndex(f"registry index {where}: {entry.name} {entry.version} has a malformed size")
        if not SHA256_HEX.fullmatch(entry.sha256):
            raise InvalidIndex(f"registry index {where}: {entry.name} {entry.version} has a malformed sha256")
        if not isinstance(entry.url, str) or not entry.url:
            raise InvalidIndex(f"registry index {where}: {entry.name} {entry.version} has a malformed url")
        return entry


def parse_index(data: bytes, where: str = INDEX_NAME) -> list[IndexEntry]:
    """Every entry of an index file's bytes, checked; raises InvalidIndex."""
    if len(data) > MAX_INDEX_BYTES:
        raise InvalidIndex(f"registry index {where} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidIndex(f"registry index {where} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("packages"), list):
        raise InvalidIndex(f'registry index {where} must be {{"packages": [...]}}')
    return [IndexEntry.from_dict(item, where) for item in obj["packages"]]


def version_key(version: str) -> tuple:
    """Natural order: numbers as numbers (1.10 > 1.9); a word after a release marks a pre-release
    (1.0-rc1 < 1.0 < 1.0.1), hence the end marker ranking between words and numbers."""
    parts = [(2, int(p), "") if p.isdigit() else (0, 0, p) for p in re.split(r"[._-]", version)]
    return (*parts, (1, 0, ""))


def latest(entries: Iterable[IndexEntry]) -> IndexEntry:
    return max(entries, key=lambda e: version_key(e.version))


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
