"""The gRPC front door (grpc.aio): service ``lipsync.v1.LipSync``, health, reflection, API keys.

It only converts: protobuf in, the data plane's plain calls (``frame``, ``batch``, ``models()``,
``stats()`` ...), protobuf out; every failure becomes its status through ``errors.reply_for``. Health is the
data plane's (``serving.health``): Check reads it, and Watch streams follow it through a listener. Requests
arrive as raw bytes and are parsed here, inside the request scope, so bytes that are not the method's message
are the client's error (INVALID_ARGUMENT), not the server's (grpc's own deserializer answers those with
UNKNOWN and an ERROR traceback in the log).
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from inference_pod.core import audio
from inference_pod.core.encoding import DEFAULT_JPEG_QUALITY, OutputSpec
from inference_pod.errors import InvalidInput, Unauthenticated, Unavailable, echo, reply_for
from inference_pod.serving.auth import ApiKeyInterceptor, key_from_metadata
from inference_pod.serving.data_plane import DataPlane
from inference_pod.serving.health import POD
from inference_pod.serving.pipeline import AudioInput, FrameRequest, FrameResult
from inference_pod.serving.session import (
    CONFIG_FIRST,
    CONFIG_ONCE,
    AudioChunk,
    Clear,
    Cleared,
    Ended,
    Flush,
    PlaybackFinished,
    SessionConfig,
    SessionFrame,
    SessionInput,
    SessionOutput,
    Started,
)
from inference_pod.serving.views import AVAILABLE, LOADED, LoadResult, ModelView, RegistryListing, StatsView
from lipsync.v1 import lipsync_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["LipSync"]
SERVICE_NAME = SERVICE.full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OPEN_HEALTH = ("", SERVICE_NAME)  # the pod's own health: always open, kubelet probes carry no key
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FORMATS = {pb.IMAGE_FORMAT_UNSPECIFIED: "jpeg", pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_PNG: "png",
           pb.IMAGE_FORMAT_RAW: "raw"}
FORMAT_ENUMS = {"jpeg": pb.IMAGE_FORMAT_JPEG, "png": pb.IMAGE_FORMAT_PNG, "raw": pb.IMAGE_FORMAT_RAW}
REGIONS = {pb.OUTPUT_REGION_UNSPECIFIED: "full", pb.OUTPUT_REGION_FULL_FRAME: "full",
           pb.OUTPUT_REGION_PREDICTION: "prediction"}
REGION_ENUMS = {"full": pb.OUTPUT_REGION_FULL_FRAME, "prediction": pb.OUTPUT_REGION_PREDICTION}
FRAME_KINDS = {"idle": pb.FRAME_KIND_IDLE, "speaking": pb.FRAME_KIND_SPEAKING, "repeated": pb.FRAME_KIND_REPEATED}
MODEL_STATES = {LOADED: pb.MODEL_STATE_LOADED, AVAILABLE: pb.MODEL_STATE_AVAILABLE}


class GrpcServer:
    """The pod's gRPC server: built, started and stopped by the composition root (inference_pod.app)."""

    def __init__(self, data_plane: DataPlane):
        self.data_plane = data_plane
        self.port: int | None = None
        self.health = PodHealth(data_plane)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        s = self.data_plane.settings
        message_bytes = s.max_message_mb << 20
        server = self._server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(self.data_plane.api_keys, self.data_plane.authenticate)],
            options=[("grpc.max_receive_message_length", message_bytes),
                     ("grpc.max_send_message_length", message_bytes),
                     ("grpc.so_reuseport", 0)],  # a port in use is an error, not a silently shared port
        )
        server.add_generic_rpc_handlers((lipsync_handlers(LipSyncServicer(self.data_plane)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME], server)
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        try:
            _check_bindable(s.host, s.port)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {address} (gRPC port, --port): {exc}") from None
        try:
            if s.tls_cert is not None and s.tls_key is not None:  # both or neither (Settings.validate)
                try:
                    pair = (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
                except OSError as exc:
                    raise InvalidInput(f"cannot read the TLS certificate or key: {exc}") from None
                self.port = server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise Unavailable(f"cannot listen on {address} (gRPC port, --port): {exc}; is another server "
                              "using it?") from None
        if not self.port:
            raise Unavailable(f"cannot listen on {address} (gRPC port, --port)")
        await self.health.sync()
        await server.start()

    async def stop(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


class PodHealth(HealthServicer):
    """grpc.health.v1 over the data plane's health, with the pod's rules: the pod's own health (service "" or
    the LipSync service's name) is open (probes carry no key); a model's health needs a key when the pod runs
    with --health-requires-key; an unknown name says so in words. Check reads the data plane; Watch streams
    are grpcio's, fed by a listener on the data plane's health."""

    def __init__(self, data_plane: DataPlane):
        super().__init__()
        self.data_plane = data_plane
        data_plane.health.subscribe(self._changed, self.enter_graceful_shutdown)

    async def sync(self) -> None:
        """Start from the data plane's health as it is now (grpcio's servicer starts out SERVING)."""
        for name, serving in self.data_plane.health.snapshot().items():
            await self._changed(name, serving)

    async def _changed(self, service: str, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in OPEN_HEALTH if service == POD else (service,):
            await self.set(name, status)

    async def _admit(self, request: health_pb2.HealthCheckRequest, context, method: str) -> None:
        if request.service in OPEN_HEALTH or not self.data_plane.health_requires_key:
            return
        try:
            self.data_plane.authenticate(key_from_metadata(context.invocation_metadata()), method)
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{exc} (this pod runs with --health-requires-key: a model's health needs a key)")

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        await self._admit(request, context, "Health.Check")
        serving = self.data_plane.health.model(POD if request.service in OPEN_HEALTH else request.service)
        status = None if serving is None else SERVING if serving else NOT_SERVING
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no model named {echo(request.service)} on this pod (service '' is the pod)")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context):
        await self._admit(request, context, "Health.Watch")
        await super().Watch(request, context)


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


def frame_request(message: pb.GenerateFrameRequest) -> FrameRequest:
    return FrameRequest(message.model, message.frame_id, audio_input(message), output_spec(message.output))


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


def model_info(view: ModelView) -> pb.ModelInfo:
    return pb.ModelInfo(**{**vars(view), "state": MODEL_STATES[view.state]})


def load_response(result: LoadResult) -> pb.LoadModelResponse:
    return pb.LoadModelResponse(model=model_info(result.model), source=result.source, load_ms=result.load_ms)


def registry_response(listing: RegistryListing) -> pb.ListRegistryResponse:
    return pb.ListRegistryResponse(registry_url=listing.registry_url,
                                   packages=[pb.RegistryPackage(**vars(p)) for p in listing.packages])


def stats_response(stats: StatsView) -> pb.GetStatsResponse:
    fields = vars(stats)
    return pb.GetStatsResponse(**{**fields, "models": [pb.ModelStats(**vars(m)) for m in stats.models],
                                  "cache": pb.CacheStats(**vars(stats.cache))})


def session_config(config: pb.SessionConfig) -> SessionConfig:
    return SessionConfig(config.model, output_spec(config.output), config.sample_rate or audio.SAMPLE_RATE,
                         config.channels or 1, paced=not config.unpaced)


def session_response(output: SessionOutput) -> pb.SessionResponse:
    if isinstance(output, SessionFrame):
        return pb.SessionResponse(frame=pb.SessionFrame(tick=output.tick, pts=output.pts, kind=FRAME_KINDS[output.kind],
                                                        frame=frame_message(output.result), audio=output.audio))
    if isinstance(output, Started):
        return pb.SessionResponse(started=pb.SessionStarted(
            session_id=output.session_id, model=output.model, model_version=output.version, fps=output.fps,
            sample_rate=output.sample_rate, samples_per_tick=output.samples_per_tick, lookahead_s=output.lookahead_s))
    if isinstance(output, Cleared):
        return pb.SessionResponse(cleared=pb.SessionCleared(**vars(output)))
    if isinstance(output, PlaybackFinished):
        return pb.SessionResponse(playback_finished=pb.PlaybackFinished(**vars(output)))
    assert isinstance(output, Ended)
    frames = output.frames
    return pb.SessionResponse(ended=pb.SessionEnded(
        ticks=output.ticks, speaking_frames=frames["speaking"], idle_cached_frames=frames["idle_cached"],
        idle_computed_frames=frames["idle_computed"], repeated_frames=frames["repeated"],
        dropped_frames=output.dropped, reason=output.reason))


def parse(message_type: type[Message], data: bytes, method: str) -> Message:
    """The method's request message, or INVALID_ARGUMENT: bytes that do not parse are the client's error."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        log.info("refused a malformed %s request (%d bytes): %s", method, len(data), exc)
        raise InvalidInput(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message: "
                           f"{exc}") from None


async def parsed(message_type: type[Message], data: AsyncIterator[bytes], method: str) -> AsyncIterator[Message]:
    """A client stream's messages, each parsed as it arrives (``parse``'s errors on the first bad one)."""
    async for item in data:
        yield parse(message_type, item, method)


# ------------------------------------------------------------------------------------------ the servicer


async def _abort(method_name: str, exc: Exception, context) -> None:
    reply = reply_for(exc, method_name)
    await context.abort(grpc.StatusCode[reply.code], reply.message)


def _unary(method):
    """A unary-request handler: bytes parsed and the method run inside the request scope; errors become
    their status codes."""
    request_type = GetMessageClass(SERVICE.methods_by_name[method.__name__].input_type)

    @functools.wraps(method)
    async def handler(self: LipSyncServicer, data: bytes, context):
        try:
            async with self.data_plane.request_scope(method.__name__):
                request = parse(request_type, data, method.__name__)
                if not SERVICE.methods_by_name[method.__name__].server_streaming:
                    return await method(self, request, context)
                async for message in method(self, request, context):
                    await context.write(message)
        except Exception as exc:
            await _abort(method.__name__, exc, context)

    return handler


class LipSyncServicer:
    """lipsync.v1.LipSync: one method per RPC, each a conversion to and from the data plane's calls."""

    def __init__(self, data_plane: DataPlane):
        self.data_plane = data_plane

    @_unary
    async def GenerateFrame(self, request: pb.GenerateFrameRequest, context) -> pb.Frame:
        return frame_message(await self.data_plane.frame(frame_request(request)))

    @_unary
    async def GenerateBatch(self, request: pb.GenerateBatchRequest, context) -> pb.GenerateBatchResponse:
        self.data_plane.check_batch_size(len(request.items))
        items = []
        for index, item in enumerate(request.items):  # a malformed item fails the request, as over HTTP
            try:
                items.append(frame_request(item))
            except InvalidInput as exc:
                raise InvalidInput(f"items[{index}]: {exc}") from None
        results = []
        for outcome in await self.data_plane.batch(items):
            if isinstance(outcome, FrameResult):
                results.append(pb.BatchItemResult(frame=frame_message(outcome)))
            else:
                results.append(pb.BatchItemResult(error=pb.ItemError(code=outcome.code, message=outcome.message)))
        return pb.GenerateBatchResponse(results=results)

    @_unary
    async def StreamFrames(self, request: pb.StreamFramesRequest, context):
        last = request.last_frame if request.HasField("last_frame") else None
        frames = self.data_plane.stream(request.model, request.first_frame, last, audio_input(request),
                                      output_spec(request.output), realtime=request.realtime, fps=request.fps)
        async for result in frames:
            yield frame_message(result)

    async def StreamAudio(self, request_iterator: AsyncIterator[bytes], context):
        """Client-streaming too, so not through ``_unary``: each message is parsed as it arrives."""
        try:
            async with self.data_plane.request_scope("StreamAudio"):
                async for message in self._stream_audio(request_iterator):
                    await context.write(message)
        except Exception as exc:
            await _abort("StreamAudio", exc, context)

    async def _stream_audio(self, request_iterator: AsyncIterator[bytes]):
        requests = parsed(pb.StreamAudioRequest, request_iterator, "StreamAudio")
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "config":
            raise InvalidInput("the first StreamAudio message must be a config (model, sample rate, channels)")
        config = first.config
        output = output_spec(config.output)

        async def chunks():
            async for message in requests:
                kind = message.WhichOneof("message")
                if kind == "config":
                    raise InvalidInput("only one config message is allowed, at the start of the stream")
                if kind is None:
                    raise InvalidInput("a StreamAudio message after the config must carry pcm16 audio; this one is "
                                       "empty")
                yield message.pcm16

        async for result in self.data_plane.live(config.model, config.sample_rate or audio.SAMPLE_RATE,
                                               config.channels or 1, chunks(), output):
            yield frame_message(result)

    async def Session(self, request_iterator: AsyncIterator[bytes], context):
        """Bidirectional: the config, then audio, clears and flushes as they come, each parsed as it arrives."""
        try:
            async with self.data_plane.request_scope("Session"):
                async for output in self._session(request_iterator):
                    await context.write(session_response(output))
        except Exception as exc:
            await _abort("Session", exc, context)

    async def _session(self, request_iterator: AsyncIterator[bytes]):
        requests = parsed(pb.SessionRequest, request_iterator, "Session")
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "config":
            raise InvalidInput(CONFIG_FIRST)
        config = session_config(first.config)

        async def inputs() -> AsyncIterator[SessionInput]:
            async for message in requests:
                kind = message.WhichOneof("message")
                if kind == "pcm16":
                    yield AudioChunk(message.pcm16)
                elif kind == "clear":
                    yield Clear()
                elif kind == "flush":
                    yield Flush()
                elif kind == "config":
                    raise InvalidInput(CONFIG_ONCE)
                else:
                    raise InvalidInput("a Session message after the config must carry pcm16, clear or flush; this "
                                       "one is empty")

        async for output in self.data_plane.session(config, inputs()):
            yield output

    @_unary
    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(view) for view in await self.data_plane.models()])

    @_unary
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        return load_response(await self.data_plane.load(request.name, request.version or None))

    @_unary
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(unloaded=await self.data_plane.unload(request.name))

    @_unary
    async def ListRegistry(self, request, context) -> pb.ListRegistryResponse:
        return registry_response(await self.data_plane.registry_listing())

    @_unary
    async def GetStats(self, request, context) -> pb.GetStatsResponse:
        return stats_response(self.data_plane.stats())


def lipsync_handlers(servicer: LipSyncServicer) -> grpc.GenericRpcHandler:
    """The service's handlers with raw-bytes requests (parsed by the methods) and protobuf responses."""
    handlers = {}
    for method in SERVICE.methods:
        behaviour = getattr(servicer, method.name)
        serialize = GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming:
            make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
                    else grpc.stream_unary_rpc_method_handler)
        else:
            make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(behaviour, request_deserializer=None, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _check_bindable(host: str, port: int) -> None:
    """Bind and release the address as gRPC will (SO_REUSEADDR), raising OSError if it cannot be had.

    gRPC's own bind failure is a RuntimeError without the reason, and its core writes a raw ``E... add_port.cc``
    line to stderr first; finding a busy or forbidden port here gives one clean line instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
