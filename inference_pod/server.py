"""The inference pod's gRPC server (grpc.aio): service ``lipsync.v1.LipSync``, health, reflection, metrics.

``LipSyncServer`` owns every part of a pod (model store, batchers, cache, metrics, API keys, the frame
pipeline); the gRPC servicer here only converts protobuf to and from the pipeline's plain types. The HTTP
gateway uses the same object: ``server.pipeline`` for frames, ``server.store`` for models,
``server.request_scope(method)`` for draining, in-flight accounting and latency metrics, and
``server.authenticate(key)`` for API keys, so both front doors behave the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from inference_pod import __version__
from inference_pod.auth import ApiKeyInterceptor, ApiKeys
from inference_pod.batcher import Batcher
from inference_pod.cache import Cache
from inference_pod.encoding import DEFAULT_JPEG_QUALITY, OutputSpec
from inference_pod.errors import InvalidInput, LipSyncError, Unavailable
from inference_pod.metrics import Metrics, MetricsHttpServer
from inference_pod.model_store import LoadedModel, LocalPackage, ModelStore, check_model_name
from inference_pod.pipeline import AudioInput, FramePipeline, FrameResult
from inference_pod.registry import RegistryClient
from inference_pod.settings import Settings
from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LipSync"].full_name
MAX_BATCH_ITEMS = 4096
FORMATS = {pb.IMAGE_FORMAT_UNSPECIFIED: "jpeg", pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_PNG: "png",
           pb.IMAGE_FORMAT_RAW: "raw"}
FORMAT_ENUMS = {"jpeg": pb.IMAGE_FORMAT_JPEG, "png": pb.IMAGE_FORMAT_PNG, "raw": pb.IMAGE_FORMAT_RAW}
REGIONS = {pb.OUTPUT_REGION_UNSPECIFIED: "full", pb.OUTPUT_REGION_FULL_FRAME: "full",
           pb.OUTPUT_REGION_PREDICTION: "prediction"}
REGION_ENUMS = {"full": pb.OUTPUT_REGION_FULL_FRAME, "prediction": pb.OUTPUT_REGION_PREDICTION}


# ------------------------------------------------------------------------------------------ the pod


class LipSyncServer:
    """One pod: build with settings, ``await start()``, ``await stop()`` (or ``run()`` for the CLI)."""

    def __init__(self, settings: Settings, *, engine_factory=None):
        self.settings = settings.validate()
        self.metrics = Metrics()
        self.api_keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else ApiKeys()
        self.draining = False
        self.ready = False  # True once the preload list is loaded (health SERVING; HTTP /health 200)
        self.started_at = time.monotonic()
        self.port: int | None = None
        self.health = HealthServicer()
        self._engine_factory = engine_factory or self._default_engine_factory
        self._inflight = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self.gateway = None  # the HTTP gateway (inference_pod.gateway), when --http-port is not 0
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever no call is in flight
        self._stopping: asyncio.Task | None = None
        self.cpu_pool = ThreadPoolExecutor(settings.encode_threads or os.cpu_count() or 2,
                                           thread_name_prefix="lipsync-cpu")
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

    def _default_engine_factory(self, package):
        from inference_pod.engine import Engine

        s = self.settings
        return Engine.from_package(package, device=s.device, precision=s.precision, max_batch=s.max_batch)

    def _make_batcher(self, name: str, engine) -> Batcher:
        s = self.settings
        return Batcher(name, engine, self.metrics, max_batch=s.max_batch, max_delay_s=s.max_batch_delay_ms / 1000,
                       max_queue=s.max_queue)

    async def _model_loaded(self, model: LoadedModel) -> None:
        await self.health.set(model.name, health_pb2.HealthCheckResponse.SERVING)
        await self.cache.model_loaded(model.name, model.version)

    async def _model_unloaded(self, name: str) -> None:
        await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

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

    async def start(self) -> LipSyncServer:
        s = self.settings
        message_bytes = s.max_message_mb << 20
        self._grpc = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(self.api_keys, on_reject=self._count_rejected)],
            options=[("grpc.max_receive_message_length", message_bytes),
                     ("grpc.max_send_message_length", message_bytes),
                     ("grpc.so_reuseport", 0)],  # a port in use is an error, not a silently shared port
        )
        pb_grpc.add_LipSyncServicer_to_server(LipSyncServicer(self), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._grpc)
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        if s.tls_cert is not None:
            try:
                pair = (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
            except OSError as exc:
                raise InvalidInput(f"cannot read the TLS certificate or key: {exc}") from None
            credentials = grpc.ssl_server_credentials([pair])
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if not self.port:
            raise Unavailable(f"cannot listen on {address}")
        if s.metrics_port:
            self._metrics_http = MetricsHttpServer(self.metrics, s.host, s.metrics_port)
        if s.http_port:
            from inference_pod.gateway import HttpGateway  # imported here: the gateway builds on this module

            self.gateway = await HttpGateway(self).start()
        self._watch_device_memory()
        await self._grpc.start()
        for pkg in await self._local_models():
            await self.health.set(pkg.name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.preload()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
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

    async def _local_models(self) -> list[LocalPackage]:
        return [versions[0] for versions in (await self.store.catalog()).values()]

    async def drain(self) -> None:
        """Health turns NOT_SERVING and new calls get UNAVAILABLE; in-flight calls carry on."""
        if not self.draining:
            log.info("draining: health NOT_SERVING, new calls rejected")
            self.draining = True
            await self.health.enter_graceful_shutdown()

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
        if self.gateway is not None:
            await self.gateway.stop()
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - time.monotonic()))
        await self.store.close()
        await self.cache.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully (the ``lipsync serve`` entry point)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: self._on_signal(s))
        await self.start()
        await self.wait_stopped()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(None))

    # -------------------------------------------------------------------------------------- shared request path

    def authenticate(self, key: str | None) -> None:
        """Raise Unauthenticated unless ``key`` is accepted (the gateway calls this per request)."""
        self.api_keys.check(key)

    def _count_rejected(self, method: str) -> None:
        self.metrics.request_duration.labels(method=method.rsplit("/", 1)[-1], code="UNAUTHENTICATED").observe(0)

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


def batch_concurrency(settings: Settings) -> int:
    """Batch items rendered at once (gRPC and HTTP): enough to fill device batches, bounded so that one big
    batch does not overflow a model's queue."""
    return max(1, min(settings.max_batch * 2, settings.max_queue))


# ------------------------------------------------------------------------------------------ protobuf conversion


def output_spec(options: pb.OutputOptions) -> OutputSpec:
    if options.format not in FORMATS:
        raise InvalidInput(f"unknown image format {options.format}")
    if options.region not in REGIONS:
        raise InvalidInput(f"unknown output region {options.region}")
    quality = options.jpeg_quality or DEFAULT_JPEG_QUALITY
    return OutputSpec(format=FORMATS[options.format], region=REGIONS[options.region], jpeg_quality=quality)


def audio_input(message: pb.GenerateFrameRequest | pb.StreamFramesRequest) -> AudioInput | None:
    if not message.HasField("audio"):
        return None
    source = message.audio.WhichOneof("source")
    if source == "file":
        return AudioInput(message.audio.file, "file")
    if source == "pcm16":
        pcm = message.audio.pcm16
        return AudioInput(pcm.data, "pcm16", pcm.sample_rate, pcm.channels or 1)
    raise InvalidInput("audio is set but holds neither a file nor pcm16")


def frame_message(result: FrameResult) -> pb.Frame:
    t = result.timings
    return pb.Frame(
        model=result.model, model_version=result.version, frame_id=result.frame_id,
        template_id=result.template_id, image=result.image, format=FORMAT_ENUMS[result.output.format],
        region=REGION_ENUMS[result.output.region], width=result.width, height=result.height,
        crop_box=pb.CropBox(x1=result.crop_box[0], y1=result.crop_box[1], x2=result.crop_box[2],
                            y2=result.crop_box[3], size=result.crop_box[4]),
        cached=result.cached,
        timings=pb.Timings(total_ms=t.total_s * 1e3, features_ms=t.features_s * 1e3, queue_ms=t.queue_s * 1e3,
                           inference_ms=t.inference_s * 1e3, encode_ms=t.encode_s * 1e3, batch_size=t.batch_size),
    )


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, LipSyncError):
        return grpc.StatusCode[exc.grpc_status], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ the servicer


async def _abort(method_name: str, exc: Exception, context) -> None:
    code, message = _status(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method_name)
    await context.abort(code, message)


def _unary(method):
    """Run a unary handler inside the request scope; project errors become their status codes."""

    @functools.wraps(method)
    async def handler(self: LipSyncServicer, request, context):
        try:
            async with self.server.request_scope(method.__name__):
                return await method(self, request, context)
        except Exception as exc:
            await _abort(method.__name__, exc, context)

    return handler


def _streaming(method):
    """The same for server-streaming handlers."""

    @functools.wraps(method)
    async def handler(self: LipSyncServicer, request, context):
        try:
            async with self.server.request_scope(method.__name__):
                async for message in method(self, request, context):
                    yield message
        except Exception as exc:
            await _abort(method.__name__, exc, context)

    return handler


class LipSyncServicer(pb_grpc.LipSyncServicer):
    def __init__(self, server: LipSyncServer):
        self.server = server
        self.pipeline = server.pipeline
        self.store = server.store

    @_unary
    async def GenerateFrame(self, request: pb.GenerateFrameRequest, context) -> pb.Frame:
        result = await self.pipeline.frame(request.model, request.frame_id, audio_input(request),
                                           output_spec(request.output))
        return frame_message(result)

    @_unary
    async def GenerateBatch(self, request: pb.GenerateBatchRequest, context) -> pb.GenerateBatchResponse:
        if len(request.items) > MAX_BATCH_ITEMS:
            raise InvalidInput(f"a batch holds at most {MAX_BATCH_ITEMS} items, got {len(request.items)}")
        limit = asyncio.Semaphore(batch_concurrency(self.server.settings))

        async def one(item: pb.GenerateFrameRequest) -> pb.BatchItemResult:
            async with limit:
                try:
                    result = await self.pipeline.frame(item.model, item.frame_id, audio_input(item),
                                                       output_spec(item.output))
                except Exception as exc:  # each item fails alone
                    code, message = _status(exc)
                    if code == grpc.StatusCode.INTERNAL:
                        log.exception("batch item failed")
                    return pb.BatchItemResult(error=pb.ItemError(code=code.name, message=message))
                return pb.BatchItemResult(frame=frame_message(result))

        results = await asyncio.gather(*(one(item) for item in request.items))
        return pb.GenerateBatchResponse(results=results)

    @_streaming
    async def StreamFrames(self, request: pb.StreamFramesRequest, context):
        last = request.last_frame if request.HasField("last_frame") else None
        frames = self.pipeline.stream(request.model, request.first_frame, last, audio_input(request),
                                      output_spec(request.output), realtime=request.realtime, fps=request.fps)
        async for result in frames:
            yield frame_message(result)

    @_streaming
    async def StreamAudio(self, request_iterator, context):
        requests = request_iterator.__aiter__()
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "config":
            raise InvalidInput("the first StreamAudio message must be a config (model, sample rate, channels)")
        config = first.config
        check_model_name(config.model)
        output = output_spec(config.output)

        async def chunks():
            async for message in requests:
                if message.WhichOneof("message") != "pcm16":
                    raise InvalidInput("only one config message is allowed, at the start of the stream")
                yield message.pcm16

        async for result in self.pipeline.live(config.model, config.sample_rate, config.channels or 1, chunks(),
                                               output):
            yield frame_message(result)

    @_unary
    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=await model_infos(self.store))

    @_unary
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        model, source, seconds = await self.store.load(request.name, request.version or None)
        return pb.LoadModelResponse(model=loaded_info(model), source=source, load_ms=seconds * 1e3)

    @_unary
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(unloaded=await self.store.unload(request.name))

    @_unary
    async def ListRegistry(self, request, context) -> pb.ListRegistryResponse:
        registry = self.server.registry
        if registry is None:
            return pb.ListRegistryResponse()
        entries = await asyncio.to_thread(registry.list, True)
        return pb.ListRegistryResponse(registry_url=registry.url, packages=[
            pb.RegistryPackage(name=e.name, version=e.version, size=e.size, sha256=e.sha256,
                               url=registry.package_url(e)) for e in entries])

    @_unary
    async def GetStats(self, request, context) -> pb.GetStatsResponse:
        return stats_message(self.server)


def loaded_info(model: LoadedModel) -> pb.ModelInfo:
    m = model.manifest
    default = model.engine.default_features
    return pb.ModelInfo(
        name=model.name, version=model.version, state=pb.MODEL_STATE_LOADED, location="memory",
        audio_mode=m.audio_mode, fps=m.fps, frame_count=m.frame_count,
        default_track_frames=0 if default is None else len(default), memory_bytes=model.memory_bytes,
        queue_depth=model.batcher.queue_depth, idle_seconds=max(0.0, time.monotonic() - model.last_used))


async def model_infos(store: ModelStore) -> list[pb.ModelInfo]:
    resident = {m.name: m for m in store.resident}
    infos = [loaded_info(m) for m in resident.values()]
    for name, versions in (await store.catalog()).items():  # scanned off the event loop
        if name in resident:
            continue
        pkg = versions[0]
        m = pkg.manifest
        infos.append(pb.ModelInfo(name=name, version=pkg.version, state=pb.MODEL_STATE_AVAILABLE,
                                  location=pkg.tier, audio_mode=m.audio_mode, fps=m.fps, frame_count=m.frame_count))
    return sorted(infos, key=lambda info: info.name)


def stats_message(server: LipSyncServer) -> pb.GetStatsResponse:
    metrics = server.metrics
    models = []
    for model in server.store.resident:
        batcher = model.batcher
        models.append(pb.ModelStats(
            name=model.name, version=model.version, queue_depth=batcher.queue_depth,
            frames_generated=int(metrics.sample("lipsync_frames_generated_total",
                                                {"model": model.name, "source": "model"})),
            frames_from_cache=int(metrics.sample("lipsync_frames_generated_total",
                                                 {"model": model.name, "source": "cache"})),
            batches=batcher.batches, mean_batch_size=batcher.items / batcher.batches if batcher.batches else 0.0))
    s = server.settings
    return pb.GetStatsResponse(
        server_version=__version__, uptime_seconds=time.monotonic() - server.started_at,
        inflight_requests=server.inflight, draining=server.draining, device=s.device, precision=s.precision,
        max_batch=s.max_batch, models=models, cache=pb.CacheStats(backend=server.cache.backend,
                                                                  **server.cache.stats()),
        models_resident=len(models), memory_budget_bytes=s.memory_budget_bytes,
        models_memory_bytes=server.store.resident_bytes)
