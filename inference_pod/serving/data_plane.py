"""The data plane: everything a front door may call, and every decision they would otherwise each make.

``DataPlane`` owns one pod's working parts (model store, batchers, cache, metrics, API keys, the CPU pool,
the frame pipeline, health) and answers every question a door is asked, in plain Python: frames, batches,
streams, models, stats, status, the registry listing. The decisions live here once: who may call
(``authenticate``), whether a call is admitted (draining) and how it is counted and timed (``request_scope``),
the batch limit, whether a request loaded its model (``auto_loaded``), how long a frame took (its
``timings.total_s``). The doors (``inference_pod.api``) only convert their protocol to these calls and
back; the composition root (``inference_pod.app``) builds this, binds the doors' ports and runs the
lifecycle. Nothing here imports or calls a door.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from inference_pod import __version__
from inference_pod.core.encoding import OutputSpec, frame_pool
from inference_pod.errors import (
    ErrorReply,
    FailedPrecondition,
    InvalidInput,
    LipSyncError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    reply_for,
)
from inference_pod.package import CharacterPackage
from inference_pod.serving.auth import ApiKeys
from inference_pod.serving.batcher import Batcher
from inference_pod.serving.cache import Cache
from inference_pod.serving.catalog import check_model_name
from inference_pod.serving.health import Health
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.model_store import LoadedModel, ModelStore
from inference_pod.serving.origins import OriginPolicy
from inference_pod.serving.pipeline import AudioInput, FramePipeline, FrameRequest, FrameResult
from inference_pod.serving.protocols import InferenceEngine
from inference_pod.serving.registry import RegistryClient
from inference_pod.serving.session import (
    ENDED_DRAINING,
    Admission,
    IdleFrames,
    Session,
    SessionConfig,
    SessionInput,
    SessionOutput,
)
from inference_pod.serving.settings import Settings
from inference_pod.serving.views import (
    AVAILABLE,
    LOADED,
    CacheStatsView,
    LoadResult,
    ModelStatsView,
    ModelView,
    Ports,
    RegistryListing,
    RegistryPackageView,
    StatsView,
    StatusView,
)

log = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 4096  # per GenerateBatch / POST /generate/batch
SHUTTING_DOWN = "the server is shutting down; retry on another replica"

EngineFactory = Callable[..., InferenceEngine]
# Whether the running task is inside a request scope: a call that reports the in-flight count leaves itself out.
_in_scope: contextvars.ContextVar[bool] = contextvars.ContextVar("lipsync_in_request_scope", default=False)


class DataPlane:
    """One pod's working parts and every call a front door makes. Build, ``await start()`` (preload),
    ``await drain()``, ``await wait_idle(deadline)``, ``await close()``."""

    max_batch_items = MAX_BATCH_ITEMS

    def __init__(self, settings: Settings, *, engine_factory: EngineFactory | None = None):
        self.settings = settings.validate()
        self.metrics = Metrics()
        self.api_keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else ApiKeys()
        self.origins = OriginPolicy(settings.allowed_origins)
        self.health = Health()
        self.started_at = time.monotonic()
        self.ports = Ports()  # set by the composition root once the doors are bound
        self._engine_factory = engine_factory or self._default_engine_factory
        self._inflight = 0
        self._idle = asyncio.Event()  # set whenever no call is in flight
        self._idle.set()
        self._connections: collections.Counter[str] = collections.Counter()
        # Frame counters at the moment each resident model was loaded: GetStats reports since the load, so
        # frames and batches of one model agree (the Prometheus counters are lifetime totals).
        self._counted_from: weakref.WeakKeyDictionary[LoadedModel, tuple[float, float]] = \
            weakref.WeakKeyDictionary()
        # The one CPU pool: compositing and encoding, large request bodies, blocking file work.
        self.cpu_threads = settings.encode_threads or os.cpu_count() or 2
        self.cpu_pool = frame_pool(self.cpu_threads, "lipsync-cpu")
        self.cache = Cache(self.metrics, redis_url=settings.redis_url, frame_ttl_s=settings.frame_cache_ttl,
                           feature_ttl_s=settings.feature_cache_ttl, memory_bytes=settings.memory_cache_mb << 20)
        self.registry = (RegistryClient(settings.registry_url, index_ttl_s=10.0, failure_ttl_s=2.0,
                                        token=settings.registry_token or None)
                         if settings.registry_url else None)
        self.store = ModelStore(
            models_dir=settings.models_dir, extract_dir=settings.extract_dir, metrics=self.metrics,
            engine_factory=self._engine_factory, batcher_factory=self._make_batcher, registry=self.registry,
            memory_budget_bytes=settings.memory_budget_bytes, on_loaded=self._model_loaded,
            on_unloaded=self._model_unloaded)
        self.pipeline = FramePipeline(self.store, self.cache, self.metrics, self.cpu_pool,
                                      max_audio_seconds=settings.max_audio_seconds)
        self.idle_frames = IdleFrames()
        self.admission = Admission(settings.max_sessions, self.metrics)
        self._sessions: set[Session] = set()  # running, for drain() to end them
        self.metrics.sessions_utilization.set_function(lambda: self.session_utilization)

    # -------------------------------------------------------------------------------------- wiring

    def _default_engine_factory(self, package: CharacterPackage) -> InferenceEngine:
        from inference_pod.core.engine import Engine  # torch: only once a model loads

        s = self.settings
        return Engine.from_package(package, device=s.device, precision=s.precision, max_batch=s.max_batch,
                                   identity_network=s.benchmark_identity_network,
                                   template_storage=s.template_storage, cpu_pool=self.cpu_pool, paste=s.paste)

    def _make_batcher(self, name: str, engine: InferenceEngine) -> Batcher:
        s = self.settings
        return Batcher(name, engine, self.metrics, max_batch=s.max_batch, max_delay_s=s.max_batch_delay_ms / 1000,
                       max_queue=s.max_queue, finisher=self.cpu_pool, finish_workers=self.cpu_threads)

    async def _model_loaded(self, model: LoadedModel) -> None:
        self._counted_from[model] = self._frames_counted(model.name)
        await self.health.set_model(model.name, True)
        await self.cache.model_loaded(model.name, model.version)

    async def _model_unloaded(self, name: str) -> None:
        self.idle_frames.forget(name)
        await self.health.set_model(name, False)

    def _watch_device_memory(self) -> None:
        self.metrics.watch_device_memory("models", lambda: self.store.resident_bytes)
        if self.settings.device == "cuda":
            import torch

            if torch.cuda.is_available():
                self.metrics.watch_device_memory("allocated", torch.cuda.memory_allocated)
                self.metrics.watch_device_memory("reserved", torch.cuda.memory_reserved)
                total = torch.cuda.get_device_properties(0).total_memory
                self.metrics.watch_device_memory("total", lambda: total)

    # -------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Known models NOT_SERVING, then the preload list loaded, then the pod healthy."""
        self._watch_device_memory()
        if self.settings.benchmark_identity_network:
            self.metrics.benchmark_identity_network.set(1)
            log.warning("BENCHMARK IDENTITY NETWORK: no U-Net runs; every frame is its template's own mouth "
                        "region. For measuring the serving layer only, never for real traffic.")
        for name in await self.store.catalog.scan():
            if self.health.model(name) is None:
                await self.health.set_model(name, False)
        await self.preload()
        await self.health.set_healthy()

    async def preload(self) -> None:
        """Load the preload list; a model that fails is logged and left for on-demand loading."""
        for name in self.settings.preload:
            try:
                await self.store.load(name)
            except LipSyncError as exc:
                log.error("preloading %s failed: %s", name, exc)

    @property
    def draining(self) -> bool:
        return self.health.draining

    async def drain(self) -> None:
        """Health turns NOT_SERVING and new calls get UNAVAILABLE; in-flight calls carry on."""
        if await self.health.drain():
            log.info("draining: health NOT_SERVING, new calls rejected")
        # A live session never finishes by itself: each is ended now, with the reason, so its client starts
        # a new one on another pod instead of losing its stream when the ports close.
        for session in list(self._sessions):
            session.end(ENDED_DRAINING)

    async def wait_idle(self, deadline: float) -> None:
        """Until no call is in flight or ``deadline`` (time.monotonic) passes."""
        while self._inflight and time.monotonic() < deadline:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), deadline - time.monotonic())

    async def close(self) -> None:
        await self.store.close()
        await self.cache.close()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------------------------------- every call

    def authenticate(self, key: str | None, method: str) -> None:
        """Raise Unauthenticated unless ``key`` is accepted; a rejection is counted under ``method``."""
        try:
            self.api_keys.check(key)
        except Unauthenticated:
            self.metrics.request_duration.labels(method=method, code="UNAUTHENTICATED").observe(0)
            raise

    def cors_origin(self, origin: str | None, host: str | None) -> str | None:
        """The Access-Control-Allow-Origin of an HTTP answer to a page at ``origin`` (None: no header, and
        the browser keeps the answer from the page); ``host`` is the address the page used for the pod."""
        return self.origins.cors_origin(origin, host)

    def check_origin(self, origin: str | None, host: str | None) -> None:
        """A WebSocket handshake from a web page: browsers send any site's handshakes with an Origin header,
        and no CORS check guards a WebSocket, so a page the pod does not allow is refused here."""
        if not self.origins.allows(origin, host):
            raise PermissionDenied(f"a web page at {origin!r} may not use this pod: allow its origin with "
                                   "--allowed-origins (LIPSYNC_ALLOWED_ORIGINS)")

    @property
    def health_requires_key(self) -> bool:
        """Per-model health needs a key (--health-requires-key); the whole pod's health never does."""
        return self.settings.health_requires_key and self.api_keys.enabled

    def admit(self) -> None:
        """Refuse new work while draining (a connection's handshake, before any call in it)."""
        if self.draining:
            raise Unavailable(SHUTTING_DOWN)

    @contextlib.asynccontextmanager
    async def request_scope(self, method: str) -> AsyncIterator[None]:
        """Every call, on every door: refused while draining, counted in flight, timed by outcome.

        In flight means: calls being served, other than the one asking. A call that reads the count
        (GetStats, /stats, /status) therefore sees the same number on every door."""
        if self.draining:
            self.metrics.request_duration.labels(method=method, code="UNAVAILABLE").observe(0)
            raise Unavailable(SHUTTING_DOWN)
        started = time.perf_counter()
        code = "OK"
        self._inflight += 1
        self.metrics.inflight_requests.inc()
        token = _in_scope.set(True)
        try:
            yield
        except LipSyncError as exc:
            code = exc.grpc_status
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            _in_scope.reset(token)
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            self.metrics.inflight_requests.dec()
            self.metrics.request_duration.labels(method=method, code=code).observe(time.perf_counter() - started)

    @property
    def inflight(self) -> int:
        return self._inflight

    @contextlib.contextmanager
    def connection(self, kind: str) -> Iterator[None]:
        """A long-lived connection (a WebSocket) held open for as long as the block runs; /status counts them."""
        self._connections[kind] += 1
        try:
            yield
        finally:
            self._connections[kind] -= 1

    def connections(self, kind: str) -> int:
        return self._connections[kind]

    # -------------------------------------------------------------------------------------- frames

    def is_resident(self, name: str) -> bool:
        return any(m.name == name for m in self.store.resident)

    def check_batch_size(self, count: int) -> None:
        if count > self.max_batch_items:
            raise InvalidInput(f"a batch holds at most {self.max_batch_items} items, got {count}")

    async def frame(self, item: FrameRequest) -> FrameResult:
        auto_loaded = not self.is_resident(item.model)
        result = await self.pipeline.frame(item.model, item.frame_id, item.audio, item.output)
        return dataclasses.replace(result, auto_loaded=auto_loaded)

    async def batch(self, items: Sequence[FrameRequest]) -> list[FrameResult | ErrorReply]:
        """Many frames, each failing alone (its ErrorReply in its place). Items run concurrently, enough to
        fill device batches and bounded so that one big batch does not overflow a model's queue."""
        self.check_batch_size(len(items))
        limit = asyncio.Semaphore(max(1, min(self.settings.max_batch * 2, self.settings.max_queue)))
        resident_before = {m.name for m in self.store.resident}

        async def one(index: int, item: FrameRequest) -> FrameResult | ErrorReply:
            async with limit:
                try:
                    result = await self.pipeline.frame(item.model, item.frame_id, item.audio, item.output)
                except Exception as exc:
                    return reply_for(exc, f"batch item {index}")
                return dataclasses.replace(result, auto_loaded=item.model not in resident_before)

        return await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))

    async def stream(self, model: str, first: int, last: int | None, audio: AudioInput | None,
                     output: OutputSpec, *, realtime: bool = False, fps: float = 0.0) -> AsyncIterator[FrameResult]:
        check_model_name(model)
        auto_loaded = not self.is_resident(model)
        async for result in self.pipeline.stream(model, first, last, audio, output, realtime=realtime, fps=fps):
            yield dataclasses.replace(result, auto_loaded=auto_loaded)

    async def live(self, model: str, sample_rate: int, channels: int, chunks: AsyncIterator[bytes],
                   output: OutputSpec) -> AsyncIterator[FrameResult]:
        check_model_name(model)
        auto_loaded = not self.is_resident(model)
        async for result in self.pipeline.live(model, sample_rate, channels, chunks, output):
            yield dataclasses.replace(result, auto_loaded=auto_loaded)

    async def session(self, config: SessionConfig, inputs: AsyncIterator[SessionInput]) -> AsyncIterator[SessionOutput]:
        """A live session (``serving.session``): refused at once past --max-sessions (Overloaded), then its
        model (loaded if need be) held for as long as the session runs."""
        with self.admission.slot():
            async with self.store.use(config.model) as model:
                session = Session(model, config, self.pipeline, self.metrics, self.idle_frames, self.cpu_pool,
                                  render_ahead_s=self.settings.session_render_ahead_ms / 1000)
                if self.draining:  # the drain began while its model loaded
                    session.end(ENDED_DRAINING)
                self._sessions.add(session)
                try:
                    async for output in session.run(inputs):
                        yield output
                finally:
                    self._sessions.discard(session)

    # The pod's session numbers, one definition for GetStats, /stats, /status and lipsync_sessions_*.

    @property
    def sessions_active(self) -> int:
        """Sessions admitted and not ended (the ones that count against --max-sessions)."""
        return self.admission.active

    @property
    def max_sessions(self) -> int:
        """The most sessions the pod admits at once; 0: no limit."""
        return self.admission.limit

    @property
    def session_utilization(self) -> float:
        """sessions_active / max_sessions (0 without a limit): the pod's session load, which autoscaling
        and pool placement read."""
        return self.sessions_active / self.max_sessions if self.max_sessions else 0.0

    def sessions_by_model(self) -> collections.Counter[str]:
        return collections.Counter(session.model.name for session in self._sessions)

    # -------------------------------------------------------------------------------------- models

    async def models(self) -> list[ModelView]:
        """Resident models (state loaded) and, for the others, the newest local package (state available).
        The models directory is scanned in a thread: a slow disk must not stall other requests."""
        catalog = await self.store.catalog.scan()
        resident = {m.name: m for m in self.store.resident}
        views = [loaded_view(m) for m in resident.values()]
        for name, versions in catalog.items():
            if name in resident:
                continue
            pkg = versions[0]
            m = pkg.manifest
            views.append(ModelView(name=name, version=pkg.version, state=AVAILABLE, location=pkg.tier,
                                   audio_mode=m.audio_mode, fps=m.fps, frame_count=m.frame_count))
        return sorted(views, key=lambda view: view.name)

    async def load(self, name: str, version: str | None = None) -> LoadResult:
        """LoadModel: from memory, the store, a local zip or the registry, whichever has it first."""
        model, source, seconds = await self.store.load(name, version or None)
        return LoadResult(model=loaded_view(model), source=source, load_ms=seconds * 1e3)

    async def unload(self, name: str) -> bool:
        return await self.store.unload(name)

    def _registry(self) -> RegistryClient:
        if self.registry is None:
            raise FailedPrecondition("no model registry is configured on this server (lipsync serve "
                                     "--registry-url URL)")
        return self.registry

    async def registry_listing(self) -> RegistryListing:
        """ListRegistry and GET /models/registry; FAILED_PRECONDITION (HTTP 409) when none is configured."""
        registry = self._registry()
        entries = await asyncio.to_thread(registry.list, True)
        return RegistryListing(registry_url=registry.url, packages=[
            RegistryPackageView(name=e.name, version=e.version, size=e.size, sha256=e.sha256,
                                url=registry.package_url(e)) for e in entries])

    async def download(self, name: str, version: str | None = None) -> LoadResult:
        """POST /models/download: the registry's newest (or the given) version, made resident. A version
        already on local disk is not downloaded again (``source`` says where it came from)."""
        check_model_name(name)
        if version is not None:
            check_model_name(version, "model version")
        registry = self._registry()
        entry = await asyncio.to_thread(registry.resolve, name, version)
        return await self.load(name, entry.version)

    # -------------------------------------------------------------------------------------- the pod's numbers

    def _frames_counted(self, name: str) -> tuple[float, float]:
        sample = self.metrics.sample
        return (sample("lipsync_frames_generated_total", {"model": name, "source": "model"}),
                sample("lipsync_frames_generated_total", {"model": name, "source": "cache"}))

    def _others_inflight(self) -> int:
        """In flight, not counting the call that asks (see request_scope)."""
        return self._inflight - (1 if _in_scope.get() else 0)

    def stats(self) -> StatsView:
        """GetStats: the pod's numbers; per model, everything counts since that model was loaded."""
        models = []
        sessions = self.sessions_by_model()
        for model in self.store.resident:
            batcher = model.batcher
            generated, cached = self._frames_counted(model.name)
            base_generated, base_cached = self._counted_from.get(model, (0.0, 0.0))
            models.append(ModelStatsView(
                name=model.name, version=model.version, queue_depth=batcher.queue_depth,
                frames_generated=int(generated - base_generated), frames_from_cache=int(cached - base_cached),
                batches=batcher.batches,
                mean_batch_size=batcher.items / batcher.batches if batcher.batches else 0.0,
                sessions_active=sessions[model.name]))
        s = self.settings
        return StatsView(
            server_version=__version__, uptime_seconds=time.monotonic() - self.started_at,
            inflight_requests=self._others_inflight(), draining=self.draining, device=s.device,
            precision=s.precision, max_batch=s.max_batch, models=models,
            cache=CacheStatsView(backend=self.cache.backend, **self.cache.stats()),
            models_resident=len(models), memory_budget_bytes=s.memory_budget_bytes,
            models_memory_bytes=self.store.resident_bytes, sessions_active=self.sessions_active,
            max_sessions=self.max_sessions,
            sessions_refused=int(self.metrics.sample("lipsync_sessions_refused_total")))

    def state(self) -> str:
        """healthy (taking requests), starting (preloading) or draining."""
        return self.health.state.value

    async def status(self) -> StatusView:
        """HTTP /status, answered while draining too."""
        s = self.settings
        models = await self.models()
        return StatusView(
            status=self.state(), server_version=__version__, uptime_seconds=time.monotonic() - self.started_at,
            draining=self.draining, device=s.device, precision=s.precision, max_batch=s.max_batch,
            inflight_requests=self._others_inflight(),
            models_resident=[m.name for m in models if m.state == LOADED],
            models_available=[m.name for m in models if m.state == AVAILABLE],
            cache_backend=self.cache.backend, registry_url=self.registry.url if self.registry else None,
            api_keys_required=self.api_keys.enabled, health_requires_key=self.health_requires_key,
            websocket_connections=self.connections("websocket"), ports=self.ports,
            sessions_active=self.sessions_active, max_sessions=self.max_sessions)


def loaded_view(model: LoadedModel) -> ModelView:
    m = model.manifest
    default = model.engine.default_features
    memory = model.memory()
    return ModelView(
        name=model.name, version=model.version, state=LOADED, location="memory",
        audio_mode=m.audio_mode, fps=m.fps, frame_count=m.frame_count,
        default_track_frames=0 if default is None else len(default), memory_bytes=memory.total,
        device_memory_bytes=memory.device, host_memory_bytes=memory.host, mapped_memory_bytes=memory.mapped,
        queue_depth=model.batcher.queue_depth, idle_seconds=max(0.0, time.monotonic() - model.last_used))
