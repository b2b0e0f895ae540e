"""What packages are on local disk: the models directory (zips) and the extracted store, scanned into
name -> versions (newest first), with each package file's identity.

The model store (model_store.py) asks the catalog where a model is before it looks in the registry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from inference_pod.errors import InvalidInput, PackageError, echo
from inference_pod.package import IDENTIFIER, MANIFEST, Manifest, read_manifest
from inference_pod.serving.registry import version_key

log = logging.getLogger(__name__)

# A package file as it is now: a failed load is remembered under it, and a changed file is tried again.
PackageIdentity = tuple[str, int, int, int]  # path, inode, size, mtime_ns


def package_identity(path: Path) -> PackageIdentity | None:
    """A zip's identity, or an extracted directory's (by its manifest: re-extraction writes a new one)."""
    target = path / MANIFEST if path.is_dir() else path
    try:
        st = target.stat()
    except OSError:
        return None
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def package_label(path: Path) -> str:
    """The name a package file goes by: its file name without ``.zip``."""
    return path.name.removesuffix(".zip")


def named_for(path: Path, name: str) -> bool:
    """Whether a package file's name says it holds model ``name``: ``name.zip``, ``name-1.zip``,
    ``name-anything`` (a version or a note after a dash, as ``lipsync package`` and downloads name them)."""
    label = package_label(path)
    return label == name or label.startswith(name + "-")


def check_model_name(name: str, what: str = "model name") -> str:
    """Names reach file paths and cache keys: only package identifiers are accepted."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise InvalidInput(f"{what} {echo(name)} is not valid: 1-63 characters of a-z, 0-9, '.', '_', '-'")
    return name


@dataclass
class LocalPackage:
    """A package on local disk: extracted (``store``) or a zip (``zip``)."""

    manifest: Manifest
    path: Path
    tier: str

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


class Catalog:
    """The local packages by name. ``models_dir`` holds zips (and extracted directories); ``extract_dir``
    the extracted store, preferred over a zip of the same version."""

    def __init__(self, models_dir: Path, extract_dir: Path):
        self.models_dir = Path(models_dir)
        self.extract_dir = Path(extract_dir)
        self._manifests: dict[Path, tuple[tuple[int, int], Manifest | None, str]] = {}  # stamp, manifest, problem
        # Package files whose name promises a model they do not give (damaged, or holding another model), with
        # why: a request for that model hears it instead of a bare "not found". Rebuilt by every scan.
        self._misleading: dict[Path, str] = {}
        self._packages: dict[str, list[LocalPackage]] = {}
        self._zips: dict[tuple[str, str], Path] = {}
        self._scan_task: asyncio.Task[dict[str, list[LocalPackage]]] | None = None

    def local_packages(self, rescan: bool = True) -> dict[str, list[LocalPackage]]:
        """Local packages by name, newest version first (extracted before zip for the same version).

        Blocking (it lists directories and reads new manifests): in the event loop, use ``scan()``."""
        if rescan:
            self._packages = self._scan()
        return self._packages

    async def scan(self) -> dict[str, list[LocalPackage]]:
        """``local_packages()``, rescanned in a worker thread so that a slow disk or a large manifest never
        stalls other requests; callers that arrive during a scan share it."""
        task = self._scan_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.local_packages))
            self._scan_task = task
        return await asyncio.shield(task)

    def misleading_for(self, name: str) -> list[str]:
        """Why each package file that looks like ``name`` is not it (as of the last scan)."""
        return [why for path, why in self._misleading.items() if named_for(path, name)]

    def zip_of(self, name: str, version: str) -> Path | None:
        """The zip an extracted copy came from, if it is still in the models directory (as of the last scan)."""
        return self._zips.get((name, version))

    def _scan(self) -> dict[str, list[LocalPackage]]:
        found: dict[tuple[str, str], LocalPackage] = {}
        zips: dict[tuple[str, str], Path] = {}
        candidates = []
        for root, tier in ((self.extract_dir, "store"), (self.models_dir, None)):
            if not root.is_dir():
                continue
            for path in sorted(root.iterdir()):
                if path.name.startswith("."):
                    continue  # temp files, partial extractions, the default store
                if path.is_dir() and (path / "manifest.json").is_file():
                    candidates.append((path, "store"))
                elif tier is None and path.suffix == ".zip" and path.is_file():
                    candidates.append((path, "zip"))
        misleading = {}
        for path, tier in candidates:
            manifest = self._manifest(path)
            if manifest is None:
                misleading[path] = f"{path} was skipped: it is damaged ({self._manifests[path][2]}); replace it"
                continue
            if not named_for(path, manifest.name):
                misleading[path] = (f"{path} was not taken as {package_label(path)!r}: it holds model "
                                    f"{manifest.name!r} (version {manifest.version}) and serves under that name; "
                                    "rename the file or ask for that name")
            key = (manifest.name, manifest.version)
            if tier == "zip":
                zips[key] = path
            if key not in found or (found[key].tier == "zip" and tier == "store"):
                found[key] = LocalPackage(manifest, path, tier)
        self._misleading = misleading
        self._zips = zips  # an extracted copy's zip, if it is still here, is checked when the copy is used
        catalog: dict[str, list[LocalPackage]] = {}
        for pkg in found.values():
            catalog.setdefault(pkg.name, []).append(pkg)
        for versions in catalog.values():
            versions.sort(key=lambda p: version_key(p.version), reverse=True)
        return catalog

    def _manifest(self, path: Path) -> Manifest | None:
        """Read a manifest once per (size, mtime); a broken package is logged and skipped, not fatal."""
        target = path / "manifest.json" if path.is_dir() else path
        try:
            st = target.stat()
        except OSError:
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._manifests.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        manifest, problem = None, ""
        try:
            manifest = read_manifest(path)
        except (PackageError, OSError) as exc:
            problem = str(exc).removeprefix(f"{path}: ")
            log.warning("skipping %s: %s", path, problem)
        if manifest is not None and not named_for(path, manifest.name):
            log.warning("%s holds model %r (version %s): it serves as %r, not as %r", path, manifest.name,
                        manifest.version, manifest.name, package_label(path))
        self._manifests[path] = (stamp, manifest, problem)
        return manifest
