"""Container image references, reduced to the repository they pull from, and the allow-list of repositories.

``lipsync-inference:0.1.0``, ``docker.io/library/lipsync-inference`` and
``index.docker.io/library/lipsync-inference@sha256:...`` are one repository; ``docker.io/attacker/miner`` is
another. An allow-list entry is a repository (any tag or digest of it) or ``prefix/*`` (every repository
under that registry path, e.g. ``registry.example.com/lipsync/*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DOCKER_HUB = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                     r"(?::[0-9]+)?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")


class InvalidImage(ValueError):
    pass


def _split_domain(name: str) -> tuple[str, list[str]]:
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        domain = DOCKER_HUB if first in ("index.docker.io", "registry-1.docker.io") else first
        if not _DOMAIN.match(domain):
            raise InvalidImage(f"{name!r}: invalid registry host {first!r}")
        return domain.lower(), rest.split("/")
    return DOCKER_HUB, name.split("/")


def repository(reference: str) -> str:
    """The canonical repository of an image reference (``docker.io/library/x`` for ``x:tag``)."""
    ref = reference.strip()
    if not ref or len(ref) > 512:
        raise InvalidImage(f"{reference!r} is not an image reference")
    name, _, digest = ref.partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidImage(f"{reference!r}: invalid digest")
    last_slash = name.rfind("/")
    if ":" in name[last_slash + 1:]:
        name, _, tag = name.rpartition(":")
        if not _TAG.match(tag):
            raise InvalidImage(f"{reference!r}: invalid tag {tag!r}")
    domain, path = _split_domain(name)
    if not all(_COMPONENT.match(c) for c in path):
        raise InvalidImage(f"{reference!r} is not an image reference (lowercase letters, digits, '.', '_', '-')")
    if domain == DOCKER_HUB and len(path) == 1:
        path = ["library", *path]
    return f"{domain}/{'/'.join(path)}"


def _entry(text: str) -> tuple[str, bool]:
    """(canonical repository or prefix ending in '/', is a prefix)."""
    entry = text.strip()
    if entry.endswith("/*"):
        domain, path = _split_domain(entry[:-2])
        if not all(_COMPONENT.match(c) for c in path):
            raise InvalidImage(f"allowed image {text!r}: expected a repository or prefix/*")
        return f"{domain}/{'/'.join(path)}/", True
    if "@" in entry or ":" in entry[entry.rfind("/") + 1:]:
        raise InvalidImage(f"allowed image {text!r}: name a repository, without a tag or digest")
    try:
        return repository(entry), False
    except InvalidImage:
        raise InvalidImage(f"allowed image {text!r}: expected a repository or prefix/*") from None


class ImagePolicy:
    def __init__(self, entries: Iterable[str]):
        self.texts = tuple(e.strip() for e in entries if e.strip())
        self._entries = [_entry(e) for e in self.texts]

    def allows(self, reference: str) -> bool:
        """Raises InvalidImage for a malformed reference."""
        repo = repository(reference)
        return any(repo.startswith(e) if prefix else repo == e for e, prefix in self._entries)

    def describe(self) -> str:
        return ", ".join(self.texts) or "none"
