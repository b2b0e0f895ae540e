"""One inference pod: its parts, its lifecycle, the bookkeeping of every call, and what both front doors show.

The shape is one data plane with thin front doors. ``Pod`` builds the model store, the batchers, the cache,
the metrics, the API keys and the frame pipeline; starts the front doors (``grpc_api.GrpcApi``,
``gateway.HttpGateway``, the metrics port) and stops them; and answers, in plain Python or as the API's
protobuf messages, everything a front door is asked: frames (``pipeline``), batches (``batch``), models,
stats, the registry listing, health. The front doors only convert their protocol to these calls and back;
they depend on the Pod and never on each other.

Every call, gRPC, HTTP or WebSocket, runs in ``request_scope`` (refused while draining, counted in flight,
timed by outcome) after ``authenticate`` (which counts rejections), and every failure becomes a reply
through ``errors.reply_for``: the same question gets the same answer on every front door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from inference_pod import __version__
from inference_pod.auth import ApiKeys
from inference_pod.batcher import Batcher
from inference_pod.cache import Cache
from inference_pod.encoding import frame_pool
from inference_pod.errors import (
    ErrorReply,
    FailedPrecondition,
    LipSyncError,
    Unauthenticated,
    Unavailable,
    reply_for,
)
from inference_pod.interfaces import InferenceEngine
from inference_pod.metrics import Metrics, MetricsHttpServer
from inference_pod.model_store import LoadedModel, ModelStore, check_model_name
from inference_pod.pipeline import FramePipeline, FrameRequest, FrameResult
from inference_pod.registry import RegistryClient
from inference_pod.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb

if TYPE_CHECKING:
    from inference_pod.gateway import HttpGateway
    from inference_pod.grpc_api import GrpcApi

log = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 4096  # per GenerateBatch / POST /generate/batch


class Pod:
    """One pod: build with settings, ``await start()``, ``await stop()`` (or ``run()`` for the CLI)."""

    max_batch_items = MAX_BATCH_ITEMS

    def __init__(self, settings: Settings, *, engine_factory=None):
        self.settings = settings.validate()
        self.metrics = Metrics()
        self.api_keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else ApiKeys()
        self.draining = False
        self.ready = False  # True once the preload list is loaded (health SERVING; HTTP /health 200)
        self.started_at = time.monotonic()
        self.grpc: GrpcApi | None = None
        self.gateway: HttpGateway | None = None  # when --http-port is not 0
        self._engine_factory = engine_factory or self._default_engine_factory
        self._inflight = 0
        self._metrics_http: MetricsHttpServer | None = None
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever no call is in flight
        self._stopping: asyncio.Task | None = None
        # Frame counters at the moment each resident model was loaded: GetStats reports since the load, so
        # frames and batches of one model agree (the Prometheus counters are lifetime totals).
        self._counted_from: weakref.WeakKeyDictionary[LoadedModel, tuple[float, float]] = \
            weakref.WeakKeyDictionary()
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

    # -------------------------------------------------------------------------------------- wiring

    def _default_engine_factory(self, package) -> InferenceEngine:
        from inference_pod.engine import Engine

        s = self.settings
        return Engine.from_package(package, device=s.device, precision=s.precision, max_batch=s.max_batch,
                                   identity_network=s.benchmark_identity_network,
                                   template_storage=s.template_storage)

    def _make_batcher(self, name: str, engine: InferenceEngine) -> Batcher:
        s = self.settings
        return Batcher(name, engine, self.metrics, max_batch=s.max_batch, max_delay_s=s.max_batch_delay_ms / 1000,
                       max_queue=s.max_queue, finisher=self.cpu_pool, finish_workers=self.cpu_threads)

    async def _model_loaded(self, model: LoadedModel) -> None:
        self._counted_from[model] = self._frames_counted(model.name)
        if self.grpc is not None:
            await self.grpc.set_serving(model.name, True)
        await self.cache.model_loaded(model.name, model.version)

    async def _model_unloaded(self, name: str) -> None:
        if self.grpc is not None:
            await self.grpc.set_serving(name, False)

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

    @property
    def port(self) -> int | None:
        """The gRPC port (the one asked for, or the one the system chose for port 0)."""
        return self.grpc.port if self.grpc is not None else None

    async def start(self) -> Pod:
        """Bind every port (a port in use is one clear error, with nothing left running), then preload."""
        from inference_pod.gateway import HttpGateway
        from inference_pod.grpc_api import GrpcApi

        s = self.settings
        try:
            self.grpc = GrpcApi(self)
            await self.grpc.start()
            if s.metrics_port:
                self._metrics_http = MetricsHttpServer(self.metrics, s.host, s.metrics_port)
            if s.http_port:
                self.gateway = await HttpGateway(self).start()
        except BaseException:
            await self._release_ports()
            self.cpu_pool.shutdown(wait=False)
            raise
        self._watch_device_memory()
        if s.benchmark_identity_network:
            self.metrics.benchmark_identity_network.set(1)
            log.warning("BENCHMARK IDENTITY NETWORK: no U-Net runs; every frame is its template's own mouth "
                        "region. For measuring the serving layer only, never for real traffic.")
        for name in await self.store.catalog():
            await self.grpc.set_serving(name, False)
        await self.grpc.set_serving("", False)
        await self.preload()
        await self.grpc.set_serving("", True)
        self.ready = True
        log.info("serving lipsync.v1 on %s:%d (%s, %s, max batch %d)%s", s.host, self.port, s.device, s.precision,
                 s.max_batch, " with TLS" if s.tls_cert else "")
        return self

    async def preload(self) -> None:
        """Load the preload list; a model that fails is logged and left for on-demand loading."""
        for name in self.settings.preload:
            try:
                await self.store.load(name)
            except LipSyncError as exc:
                log.error("preloading %s failed: %s", name, exc)

    async def drain(self) -> None:
        """Health turns NOT_SERVING and new calls get UNAVAILABLE; in-flight calls carry on."""
        if not self.draining:
            log.info("draining: health NOT_SERVING, new calls rejected")
            self.draining = True
            if self.grpc is not None:
                await self.grpc.drain()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, give in-flight calls up to ``grace_s`` to finish, then release everything. Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float | None) -> None:
        await self.drain()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        # Keep listening while in-flight calls finish, so probes read NOT_SERVING and new calls get a clean
        # UNAVAILABLE from us rather than a refused connection; then stop listening.
        while self._inflight and time.monotonic() < deadline:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), deadline - time.monotonic())
        await self._release_ports(max(0.0, deadline - time.monotonic()))
        await self.store.close()
        await self.cache.close()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stopped")

    async def _release_ports(self, grace_s: float = 0.0) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace_s)
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully (the ``lipsync serve`` entry point)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self.start()
        await self.wait_stopped()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(None))

    # -------------------------------------------------------------------------------------- every call

    def authenticate(self, key: str | None, method: str) -> None:
        """Raise Unauthenticated unless ``key`` is accepted; a rejection is counted under ``method``."""
        try:
            self.api_keys.check(key)
        except Unauthenticated:
            self.metrics.request_duration.labels(method=method, code="UNAUTHENTICATED").observe(0)
            raise

    @property
    def health_requires_key(self) -> bool:
        """Per-model health needs a key (--health-requires-key); the whole pod's health never does."""
        return self.settings.health_requires_key and self.api_keys.enabled

    @contextlib.asynccontextmanager
    async def request_scope(self, method: str) -> AsyncIterator[None]:
        """Every call, gRPC or HTTP: refused while draining, counted in flight, timed by outcome."""
        if self.draining:
            self.metrics.request_duration.labels(method=method, code="UNAVAILABLE").observe(0)
            raise Unavailable("the server is shutting down; retry on another replica")
        started = time.perf_counter()
        code = "OK"
        self._inflight += 1
        self.metrics.inflight_requests.inc()
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
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            self.metrics.inflight_requests.dec()
            self.metrics.request_duration.labels(method=method, code=code).observe(time.perf_counter() - started)

    @property
    def inflight(self) -> int:
        return self._inflight

    async def batch(self, items: Sequence[FrameRequest]) -> list[FrameResult | ErrorReply]:
        """Many frames, each failing alone (its ErrorReply in its place). Items run concurrently, enough to
        fill device batches and bounded so that one big batch does not overflow a model's queue."""
        limit = asyncio.Semaphore(max(1, min(self.settings.max_batch * 2, self.settings.max_queue)))

        async def one(index: int, item: FrameRequest) -> FrameResult | ErrorReply:
            async with limit:
                try:
                    return await self.pipeline.frame(item.model, item.frame_id, item.audio, item.output)
                except Exception as exc:
                    return reply_for(exc, f"batch item {index}")

        return await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))

    # -------------------------------------------------------------------------------------- views

    def state(self) -> str:
        """healthy (taking requests), starting (preloading) or draining."""
        if self.draining:
            return "draining"
        return "healthy" if self.ready else "starting"

    def is_resident(self, name: str) -> bool:
        return any(m.name == name for m in self.store.resident)

    async def models(self) -> list[pb.ModelInfo]:
        """Resident models (state loaded) and, for the others, the newest local package (state available).
        The models directory is scanned in a thread: a slow disk must not stall other requests."""
        catalog = await self.store.catalog()
        resident = {m.name: m for m in self.store.resident}
        infos = [loaded_info(m) for m in resident.values()]
        for name, versions in catalog.items():
            if name in resident:
                continue
            pkg = versions[0]
            m = pkg.manifest
            infos.append(pb.ModelInfo(name=name, version=pkg.version, state=pb.MODEL_STATE_AVAILABLE,
                                      location=pkg.tier, audio_mode=m.audio_mode, fps=m.fps,
                                      frame_count=m.frame_count))
        return sorted(infos, key=lambda info: info.name)

    def _frames_counted(self, name: str) -> tuple[float, float]:
        sample = self.metrics.sample
        return (sample("lipsync_frames_generated_total", {"model": name, "source": "model"}),
                sample("lipsync_frames_generated_total", {"model": name, "source": "cache"}))

    def stats(self) -> pb.GetStatsResponse:
        """GetStats: the pod's numbers; per model, everything counts since that model was loaded."""
        models = []
        for model in self.store.resident:
            batcher = model.batcher
            generated, cached = self._frames_counted(model.name)
            base_generated, base_cached = self._counted_from.get(model, (0.0, 0.0))
            models.append(pb.ModelStats(
                name=model.name, version=model.version, queue_depth=batcher.queue_depth,
                frames_generated=int(generated - base_generated), frames_from_cache=int(cached - base_cached),
                batches=batcher.batches,
                mean_batch_size=batcher.items / batcher.batches if batcher.batches else 0.0))
        s = self.settings
        return pb.GetStatsResponse(
            server_version=__version__, uptime_seconds=time.monotonic() - self.started_at,
            inflight_requests=self.inflight, draining=self.draining, device=s.device, precision=s.precision,
            max_batch=s.max_batch, models=models,
            cache=pb.CacheStats(backend=self.cache.backend, **self.cache.stats()),
            models_resident=len(models), memory_budget_bytes=s.memory_budget_bytes,
            models_memory_bytes=self.store.resident_bytes)

    async def status(self) -> dict[str, Any]:
        """HTTP /status: the pod's state, settings and ports. Model lists are ``models()``'s states."""
        s = self.settings
        models = await self.models()
        return {
            "status": self.state(), "server_version": __version__,
            "uptime_seconds": time.monotonic() - self.started_at, "draining": self.draining,
            "device": s.device, "precision": s.precision, "max_batch": s.max_batch,
            "inflight_requests": self.inflight,
            "models_resident": [m.name for m in models if m.state == pb.MODEL_STATE_LOADED],
            "models_available": [m.name for m in models if m.state == pb.MODEL_STATE_AVAILABLE],
            "cache_backend": self.cache.backend, "registry_url": self.registry.url if self.registry else None,
            "api_keys_required": self.api_keys.enabled,
            "health_requires_key": self.health_requires_key,
            "websocket_connections": len(self.gateway.sockets) if self.gateway is not None else 0,
            "ports": {"grpc": self.port, "http": self.gateway.port if self.gateway is not None else None,
                      "metrics": self._metrics_http.port if self._metrics_http is not None else None},
        }

    def _registry(self) -> RegistryClient:
        if self.registry is None:
            raise FailedPrecondition("no model registry is configured on this server (lipsync serve "
                                     "--registry-url URL)")
        return self.registry

    async def registry_listing(self) -> pb.ListRegistryResponse:
        """ListRegistry and GET /models/registry; FAILED_PRECONDITION (HTTP 409) when none is configured."""
        registry = self._registry()
        entries = await asyncio.to_thread(registry.list, True)
        return pb.ListRegistryResponse(registry_url=registry.url, packages=[
            pb.RegistryPackage(name=e.name, version=e.version, size=e.size, sha256=e.sha256,
                               url=registry.package_url(e)) for e in entries])

    async def load(self, name: str, version: str | None = None) -> pb.LoadModelResponse:
        """LoadModel: from memory, the store, a local zip or the registry, whichever has it first."""
        model, source, seconds = await self.store.load(name, version or None)
        return pb.LoadModelResponse(model=loaded_info(model), source=source, load_ms=seconds * 1e3)

    async def download(self, name: str, version: str | None = None) -> pb.LoadModelResponse:
        """POST /models/download: the registry's newest (or the given) version, made resident. A version
        already on local disk is not downloaded again (``source`` says where it came from)."""
        check_model_name(name)
        if version is not None:
            check_model_name(version, "model version")
        registry = self._registry()
        entry = await asyncio.to_thread(registry.resolve, name, version)
        return await self.load(name, entry.version)


def loaded_info(model: LoadedModel) -> pb.ModelInfo:
    m = model.manifest
    default = model.engine.default_features
    memory = model.memory()
    return pb.ModelInfo(
        name=model.name, version=model.version, state=pb.MODEL_STATE_LOADED, location="memory",
        audio_mode=m.audio_mode, fps=m.fps, frame_count=m.frame_count,
        default_track_frames=0 if default is None else len(default), memory_bytes=memory.total,
        device_memory_bytes=memory.device, host_memory_bytes=memory.host,
        queue_depth=model.batcher.queue_depth, idle_seconds=max(0.0, time.monotonic() - model.last_used))
