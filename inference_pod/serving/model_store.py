"""Which models are resident, and getting the others there: memory -> extracted store -> local zip -> registry
(what is on local disk is the catalog's: catalog.py).

Every request goes through ``use(name)``: a resident model is returned at once; otherwise one load runs per
model however many requests wait for it. After a load, least-recently-used models are unloaded until the
resident set fits the memory budget. An unloaded model leaves once its in-flight requests are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from inference_pod.core.memory import MemoryUse
from inference_pod.errors import LipSyncError, ModelNotFound, PackageError, StorageFull, Unavailable
from inference_pod.package import (
    AUDIO_ENCODER,
    MANIFEST,
    CharacterPackage,
    Manifest,
    check_extracted_source,
    extract_package,
    open_package,
    read_manifest,
)
from inference_pod.serving.catalog import (
    Catalog,
    LocalPackage,
    PackageIdentity,
    check_model_name,
    package_identity,
)
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.node_store import COLLECT_EVERY_S, STALE_AFTER_S, CopyLease, collect_garbage
from inference_pod.serving.protocols import FrameBatcher, InferenceEngine
from inference_pod.serving.registry import RegistryClient

log = logging.getLogger(__name__)


MAX_REMEMBERED_FAILURES = 256


@dataclass(eq=False)
class LoadedModel:
    """A resident model: its engine, its batcher, and who is using it."""

    name: str
    version: str
    engine: InferenceEngine
    batcher: FrameBatcher
    manifest: Manifest
    source: str
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0
    lease: CopyLease | None = None  # on its extracted copy: no process on the node removes it meanwhile
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def memory(self) -> MemoryUse:
        """Bytes the engine holds now: its template encodings and decoded frames grow after load, up to caps."""
        return self.engine.memory_use()

    @property
    def encoder_id(self) -> str | None:
        """Identifies the audio features this model consumes: same id, same features for the same audio."""
        member = self.manifest.members.get(AUDIO_ENCODER)
        return f"{self.manifest.audio_mode}-{member['sha256']}" if member else None

    def acquire(self) -> None:
        self.users += 1
        self.last_used = time.monotonic()
        self._idle.clear()

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


EngineFactory = Callable[[CharacterPackage], InferenceEngine]  # package -> engine (blocking; runs in a thread)
BatcherFactory = Callable[[str, InferenceEngine], FrameBatcher]  # (model name, engine) -> Batcher (event loop)


def store_copy(store_dir: Path, manifest: Manifest) -> Path:
    """Where a store keeps its one extracted copy of a package version (``lipsync demo`` puts its copy there
    too, so a pod serving the demo's output reuses it instead of extracting a second one)."""
    return Path(store_dir) / f"{manifest.name}-{manifest.version}"


class ModelStore:
    def __init__(self, *, models_dir: Path, extract_dir: Path, metrics: Metrics, engine_factory: EngineFactory,
                 batcher_factory: BatcherFactory, registry: RegistryClient | None = None,
                 memory_budget_bytes: int = 0, stale_after_s: float = STALE_AFTER_S,
                 collect_every_s: float = COLLECT_EVERY_S,
                 on_loaded: Callable[[LoadedModel], Awaitable[None]] | None = None,
                 on_unloaded: Callable[[str], Awaitable[None]] | None = None):
        self.catalog = Catalog(models_dir, extract_dir)
        self.models_dir = self.catalog.models_dir
        self.extract_dir = self.catalog.extract_dir
        self.registry = registry
        self.memory_budget_bytes = memory_budget_bytes
        self.stale_after_s = stale_after_s  # how long an unused superseded copy stays (node_store.py)
        self.collect_every_s = collect_every_s  # besides after each unload; 0: only then
        self._collector: asyncio.Task[None] | None = None
        self._metrics = metrics
        self._engine_factory = engine_factory
        self._batcher_factory = batcher_factory
        self._on_loaded = on_loaded
        self._on_unloaded = on_unloaded
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loads: dict[str, tuple[asyncio.Task[tuple[LoadedModel, str]], str | None]] = {}  # name -> (load, version asked for)
        self._retiring: set[asyncio.Task[None]] = set()
        # Packages that failed to load (broken, or weights that do not fit), by file identity: every request
        # would otherwise repeat the same expensive failure. Only PackageErrors: they depend on the file alone.
        self._failed: OrderedDict[PackageIdentity, PackageError] = OrderedDict()
        self._closed = False

    # -------------------------------------------------------------------------------------- lookups

    @property
    def resident(self) -> list[LoadedModel]:
        return list(self._resident.values())

    @property
    def resident_bytes(self) -> int:
        return sum(m.memory().total for m in self._resident.values())

    # -------------------------------------------------------------------------------------- using

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[LoadedModel]:
        """The resident model ``name`` (loaded if needed), held resident for the duration of the block."""
        model = await self.get(name)
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    async def get(self, name: str, version: str | None = None) -> LoadedModel:
        model = self._resident.get(name)
        if model is not None and (not version or model.version == version):
            self._resident.move_to_end(name)  # most recently used last: eviction takes from the front
            return model
        model, _, _ = await self.load(name, version)
        return model

    async def load(self, name: str, version: str | None = None) -> tuple[LoadedModel, str, float]:
        """Make ``name`` resident; returns (model, source tier, seconds). Concurrent callers share one load."""
        check_model_name(name)
        if version:
            check_model_name(version, "model version")
        started = time.perf_counter()
        model = self._resident.get(name)
        if model is not None and (not version or model.version == version):
            self._metrics.model_loads.labels(model=name, source="memory", result="ok").inc()
            return model, "memory", time.perf_counter() - started
        if self._closed:
            raise Unavailable("the server is shutting down")
        running = self._loads.get(name)
        if running is not None and version and running[1] != version:
            with contextlib.suppress(Exception):
                await asyncio.shield(running[0])  # a load of another version: let it land, then replace it
            running = self._loads.get(name)
        if running is None or (version and running[1] != version):
            task = asyncio.get_running_loop().create_task(self._load(name, version), name=f"load-{name}")
            self._loads[name] = (task, version)
            task.add_done_callback(lambda t: self._forget_load(name, t))
        else:
            task = running[0]
        # Shielded: a caller that gives up (client cancelled) must not cancel the load for everyone else.
        loaded, source = await asyncio.shield(task)
        return loaded, source, time.perf_counter() - started

    def _forget_load(self, name: str, task: asyncio.Task) -> None:
        if name in self._loads and self._loads[name][0] is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()  # retrieved here so a load nobody awaited anymore is not reported as lost

    async def _load(self, name: str, version: str | None) -> tuple[LoadedModel, str]:
        started = time.perf_counter()
        try:
            package, source, identity, lease = await self._find_package(name, version)  # counts failures per tier
            try:
                engine = await asyncio.to_thread(self._engine_factory, package)
            except Exception as exc:
                lease.release()
                self._metrics.model_loads.labels(model=name, source=source, result="error").inc()
                if isinstance(exc, PackageError):  # weights that do not fit: so they stay until the file changes
                    self._remember_failure(identity, exc)
                raise
        except (ModelNotFound, Unavailable):
            raise
        except StorageFull as exc:  # the operator's to fix, and said in one line: no traceback per request
            log.warning("loading %s failed: %s", name, exc)
            raise
        except Exception as exc:
            # A broken package or an engine that cannot be built (device, memory) is the server's problem,
            # not the caller's: UNAVAILABLE, with the reason, rather than INVALID_ARGUMENT or INTERNAL.
            if not isinstance(exc, LipSyncError):
                log.exception("loading %s failed", name)
            raise Unavailable(f"model {name!r} cannot be loaded: {exc}") from exc
        model = LoadedModel(name=name, version=package.manifest.version, engine=engine,
                            batcher=self._batcher_factory(name, engine), manifest=package.manifest, source=source,
                            lease=lease)
        previous = self._resident.pop(name, None)
        self._resident[name] = model
        elapsed = time.perf_counter() - started
        self._metrics.model_loads.labels(model=name, source=source, result="ok").inc()
        self._metrics.model_load_duration.observe(elapsed)
        self._metrics.models_resident.set(len(self._resident))
        log.info("loaded %s %s from %s in %.2fs (%.1f MiB)", name, model.version, source, elapsed, model.memory().total / 2**20)
        if previous is not None:
            self._retire_later(previous)
        self._collect_periodically()
        if self._on_loaded is not None:
            await self._on_loaded(model)
        await self._enforce_budget(keep=name)
        return model, source

    async def _find_package(self, name: str, version: str | None
                            ) -> tuple[CharacterPackage, str, PackageIdentity | None, CopyLease]:
        """(package, tier, its file's identity, a lease on its extracted copy); each tier falls through to the
        next on failure (a store copy collected since the scan falls through to its zip)."""
        errors: list[LipSyncError] = []
        catalog = await self.catalog.scan()
        local = [p for p in catalog.get(name, []) if not version or p.version == version]
        if local:
            chosen_version = local[0].version
            for pkg in (p for p in local if p.version == chosen_version):  # store first, then zip
                identity = package_identity(pkg.path)
                try:
                    self._raise_known_failure(identity)
                    if pkg.tier == "store":
                        found = await self._open_store_copy(pkg)
                        if found is None:
                            continue
                        return found[0], "store", identity, found[1]
                    package, lease = await asyncio.to_thread(self._extract, pkg.path, pkg.manifest)
                    return package, "zip", identity, lease
                except StorageFull as exc:
                    self._metrics.model_loads.labels(model=name, source=pkg.tier, result="error").inc()
                    raise self._storage_full(name, exc) from None
                except PackageError as exc:
                    if self._remember_failure(identity, exc):
                        log.warning("local package %s unusable: %s", pkg.path, exc)
                    self._metrics.model_loads.labels(model=name, source=pkg.tier, result="error").inc()
                    errors.append(exc)
        if self.registry is None:
            if errors:
                raise errors[0]
            what = f"{name} {version}" if version else name
            raise self._not_found(name, f"model {what!r} is not in {self.models_dir} and no registry is configured")
        identity = None
        try:
            zip_path = await asyncio.to_thread(self.registry.fetch, name, version, self.models_dir)
            identity = package_identity(zip_path)
            self._raise_known_failure(identity)
            manifest = await asyncio.to_thread(read_manifest, zip_path)
            if manifest.name != name:
                raise PackageError(f"the registry's package for {name!r} contains model {manifest.name!r}")
            package, lease = await asyncio.to_thread(self._extract, zip_path, manifest)
            return package, "registry", identity, lease
        except ModelNotFound as exc:
            if errors:
                raise errors[0] from None  # the local package's problem says more than "not in the registry"
            raise self._not_found(name, str(exc)) from None
        except LipSyncError as exc:
            if isinstance(exc, PackageError):
                self._remember_failure(identity, exc)
            self._metrics.model_loads.labels(model=name, source="registry", result="error").inc()
            if isinstance(exc, StorageFull):
                raise self._storage_full(name, exc) from None
            raise

    def _raise_known_failure(self, identity: PackageIdentity | None) -> None:
        known = self._failed.get(identity) if identity is not None else None
        if known is not None:
            raise type(known)(str(known))  # a fresh one: re-raising the same object would grow its traceback

    def _remember_failure(self, identity: PackageIdentity | None, exc: PackageError) -> bool:
        """Remember why this file cannot load; True the first time (worth a log line)."""
        if identity is None:
            return True
        first = identity not in self._failed
        self._failed[identity] = exc
        self._failed.move_to_end(identity)
        while len(self._failed) > MAX_REMEMBERED_FAILURES:
            self._failed.popitem(last=False)
        return first

    def _not_found(self, name: str, message: str) -> ModelNotFound:
        """NOT_FOUND, saying which package files looked like ``name`` and why none of them is it."""
        return ModelNotFound("; ".join([message, *self.catalog.misleading_for(name)[:3]]))

    def _storage_full(self, name: str, exc: StorageFull) -> StorageFull:
        """Not remembered as a failure: freeing space fixes it, and the next request tries again."""
        return StorageFull(f"model {name!r} cannot be loaded: {exc}: free space there, or give the pod a larger "
                           "disk (--store-dir for extracted packages, --models-dir for downloads)")

    async def _open_store_copy(self, pkg: LocalPackage) -> tuple[CharacterPackage, CopyLease] | None:
        """The extracted copy, leased before it is opened; None if it was collected since the scan."""
        lease = await asyncio.to_thread(CopyLease.take, pkg.path)
        try:
            if not (pkg.path / MANIFEST).is_file():
                lease.release()
                return None
            source = self.catalog.zip_of(pkg.name, pkg.version)
            if source is not None:  # the copy is served; a zip damaged since is reported, not hidden
                await asyncio.to_thread(check_extracted_source, source, pkg.path)
            return await asyncio.to_thread(open_package, pkg.path), lease
        except BaseException:
            lease.release()
            raise

    def _extract(self, zip_path: Path, manifest: Manifest) -> tuple[CharacterPackage, CopyLease]:
        """Extracted into the store, under a lease on the copy (taken before the copy exists)."""
        copy = store_copy(self.extract_dir, manifest)
        lease = CopyLease.take(copy)
        try:
            return extract_package(zip_path, copy), lease
        except BaseException:
            lease.release()
            raise

    def _collect_periodically(self) -> None:
        """From the first load on: a copy released an hour ago is stale only then, and the pod that replaced
        another on a rolling update may never unload anything itself."""
        if self._collector is not None or self._closed or self.collect_every_s <= 0:
            return

        async def collect() -> None:
            while not self._closed:
                await asyncio.sleep(self.collect_every_s)
                await self.collect_garbage()

        self._collector = asyncio.get_running_loop().create_task(collect(), name="collect-store")

    async def collect_garbage(self) -> None:
        """Remove the store's superseded copies and leftovers that no process on the node uses
        (node_store.py); failures are logged, never raised: this is housekeeping."""
        try:
            await asyncio.to_thread(collect_garbage, self.extract_dir, self.models_dir,
                                    stale_after_s=self.stale_after_s)
        except Exception:
            log.exception("collecting the store %s failed", self.extract_dir)

    # -------------------------------------------------------------------------------------- unloading

    async def unload(self, name: str) -> bool:
        """Unload ``name``; False if it was not resident. Unknown names raise ModelNotFound."""
        check_model_name(name)
        running = self._loads.get(name)
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running[0])
        model = self._resident.pop(name, None)
        if model is None:
            if name not in await self.catalog.scan():
                raise ModelNotFound(f"model {name!r} is not loaded and not in {self.models_dir}")
            return False
        self._metrics.models_resident.set(len(self._resident))
        await self._retire(model)
        return True

    def _retire_later(self, model: LoadedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(model), name=f"retire-{model.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, model: LoadedModel) -> None:
        """Let its in-flight requests finish, then free it."""
        if self._on_unloaded is not None and model.name not in self._resident:
            await self._on_unloaded(model.name)
        await model.wait_idle()
        await model.batcher.close()
        model.engine.close()
        if model.lease is not None:
            model.lease.release()
        log.info("unloaded %s %s", model.name, model.version)
        if not self._closed:
            await self.collect_garbage()  # a version replaced or unloaded may now be no one's

    async def _enforce_budget(self, keep: str) -> None:
        if self.memory_budget_bytes <= 0:
            return
        while self.resident_bytes > self.memory_budget_bytes:
            victim = next((n for n in self._resident if n != keep), None)
            if victim is None:
                log.warning("model %s alone (%d MiB) exceeds the memory budget of %d MiB", keep,
                            self.resident_bytes >> 20, self.memory_budget_bytes >> 20)
                return
            log.info("unloading %s to stay within the memory budget", victim)
            model = self._resident.pop(victim)
            self._metrics.models_resident.set(len(self._resident))
            self._retire_later(model)  # not awaited: its in-flight requests may take a while

    async def close(self) -> None:
        self._closed = True
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        for task, _ in list(self._loads.values()):
            with contextlib.suppress(BaseException):
                await task
        while self._resident:
            _, model = self._resident.popitem(last=False)
            self._retire_later(model)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._metrics.models_resident.set(0)
