"""Python clients for the ``lipsync.v1.LipSync`` service: ``LipSyncClient`` (blocking) and
``AsyncLipSyncClient`` (asyncio). Both take the same arguments and return the protobuf messages.

    with LipSyncClient("localhost:50051", api_key="...") as client:
        frame = client.generate_frame("demo", 12, audio=Path("speech.wav"))
        image = decode_frame(frame)            # (H, W, 3) uint8 BGR

Audio is a file's bytes, a path to a file, or ``Pcm16(data, sample_rate, channels)`` for raw PCM.
Errors are ``grpc.RpcError`` with the server's status code and message.

A live session (``Session`` RPC) is an object to write to and read from at once:

    with client.session("demo") as session:    # the avatar idles from here on, one frame per tick
        session.send_audio(pcm16)              # 16 kHz mono PCM16 as it is produced (e.g. by TTS)
        session.flush()                        # end of the utterance: playback_finished follows
        for response in session:               # SessionResponse: started, frame, cleared, playback_finished, ended
            ...                                # session.clear() barges in; session.end() ends it
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lipsync.v1 import lipsync_pb2 as pb
from lipsync.v1 import lipsync_pb2_grpc as pb_grpc

FORMATS = {"jpeg": pb.IMAGE_FORMAT_JPEG, "png": pb.IMAGE_FORMAT_PNG, "raw": pb.IMAGE_FORMAT_RAW}
REGIONS = {"full": pb.OUTPUT_REGION_FULL_FRAME, "prediction": pb.OUTPUT_REGION_PREDICTION}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "raw": "bgr"}


class FrameStream(Protocol):
    """A server-streaming call as grpc returns it: the frames as they come, and a way to stop them."""

    def __iter__(self) -> Iterator[pb.Frame]: ...
    def __next__(self) -> pb.Frame: ...
    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class Pcm16:
    """Raw little-endian 16-bit PCM (interleaved when channels > 1)."""

    data: bytes
    sample_rate: int
    channels: int = 1


AudioLike = bytes | str | Path | Pcm16 | None


def audio_message(audio: AudioLike) -> pb.Audio | None:
    if audio is None:
        return None
    if isinstance(audio, Pcm16):
        return pb.Audio(pcm16=pb.Pcm16Audio(data=audio.data, sample_rate=audio.sample_rate, channels=audio.channels))
    if isinstance(audio, (str, Path)):
        audio = Path(audio).read_bytes()
    return pb.Audio(file=bytes(audio))


def output_options(format: str = "jpeg", region: str = "full", jpeg_quality: int = 0) -> pb.OutputOptions:
    try:
        return pb.OutputOptions(format=FORMATS[format], region=REGIONS[region], jpeg_quality=jpeg_quality)
    except KeyError as exc:
        raise ValueError(f"unknown output option {exc.args[0]!r}: formats {list(FORMATS)}, "
                         f"regions {list(REGIONS)}") from None


def frame_request(model: str, frame_id: int, audio: AudioLike = None, *, format: str = "jpeg",
                  region: str = "full", jpeg_quality: int = 0) -> pb.GenerateFrameRequest:
    return pb.GenerateFrameRequest(model=model, frame_id=frame_id, audio=audio_message(audio),
                                   output=output_options(format, region, jpeg_quality))


def stream_frames_request(model: str, first: int = 0, last: int | None = None, audio: AudioLike = None, *,
                          realtime: bool = False, fps: float = 0.0, format: str = "jpeg", region: str = "full",
                          jpeg_quality: int = 0) -> pb.StreamFramesRequest:
    request = pb.StreamFramesRequest(model=model, first_frame=first, audio=audio_message(audio), realtime=realtime,
                                     fps=fps, output=output_options(format, region, jpeg_quality))
    if last is not None:
        request.last_frame = last
    return request


def stream_audio_config(model: str, sample_rate: int = 16000, channels: int = 1, *, format: str = "jpeg",
                        region: str = "full", jpeg_quality: int = 0) -> pb.StreamAudioRequest:
    return pb.StreamAudioRequest(config=pb.StreamAudioConfig(
        model=model, sample_rate=sample_rate, channels=channels, output=output_options(format, region, jpeg_quality)))


def session_config(model: str, *, unpaced: bool = False, format: str = "jpeg", region: str = "full",
                   jpeg_quality: int = 0) -> pb.SessionRequest:
    return pb.SessionRequest(config=pb.SessionConfig(model=model, sample_rate=16000, channels=1, unpaced=unpaced,
                                                     output=output_options(format, region, jpeg_quality)))


CLEAR = pb.SessionRequest(clear=pb.SessionClear())
FLUSH = pb.SessionRequest(flush=pb.SessionFlush())


class LiveSession:
    """A running ``Session`` call (blocking client): send from any thread, iterate the responses."""

    def __init__(self, stub: pb_grpc.LipSyncStub, config: pb.SessionRequest, metadata):
        self._outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._call = stub.Session(self._requests(config), metadata=metadata)

    def _requests(self, config: pb.SessionRequest) -> Iterator[pb.SessionRequest]:
        yield config
        while (message := self._outgoing.get()) is not None:
            yield message

    def send_audio(self, pcm16: bytes) -> None:
        """16 kHz mono 16-bit little-endian samples; queued behind what was sent before."""
        self._outgoing.put(pb.SessionRequest(pcm16=bytes(pcm16)))

    def flush(self) -> None:
        self._outgoing.put(FLUSH)

    def clear(self) -> None:
        self._outgoing.put(CLEAR)

    def end(self) -> None:
        """Half-close: the server ends the session (SessionEnded, then the stream's end)."""
        self._outgoing.put(None)

    def cancel(self) -> None:
        self._outgoing.put(None)
        self._call.cancel()

    def __iter__(self) -> Iterator[pb.SessionResponse]:
        return iter(self._call)

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncLiveSession:
    """A running ``Session`` call (asyncio client): ``await send_audio(...)``, ``async for`` the responses."""

    def __init__(self, stub: pb_grpc.LipSyncStub, config: pb.SessionRequest, metadata):
        self._outgoing: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
        self._call = stub.Session(self._requests(config), metadata=metadata)

    async def _requests(self, config: pb.SessionRequest) -> AsyncIterator[pb.SessionRequest]:
        yield config
        while (message := await self._outgoing.get()) is not None:
            yield message

    async def send_audio(self, pcm16: bytes) -> None:
        await self._outgoing.put(pb.SessionRequest(pcm16=bytes(pcm16)))

    async def flush(self) -> None:
        await self._outgoing.put(FLUSH)

    async def clear(self) -> None:
        await self._outgoing.put(CLEAR)

    async def end(self) -> None:
        await self._outgoing.put(None)

    def cancel(self) -> None:
        self._call.cancel()

    def __aiter__(self) -> AsyncIterator[pb.SessionResponse]:
        return self._call.__aiter__()

    async def __aenter__(self) -> AsyncLiveSession:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


def decode_frame(frame: pb.Frame):
    """The frame's image as an (H, W, 3) uint8 BGR array."""
    from inference_pod.core.encoding import decode_image

    return decode_image(frame.image, FORMAT_NAMES.get(frame.format, "jpeg"), frame.width, frame.height)


_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def message_to_dict(message) -> dict:
    """A response as plain JSON-able data: proto field names, zero values included, and 64-bit integers as
    numbers (protobuf's JSON mapping writes them as strings, for JavaScript's sake)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _int64_as_numbers(message, data)


def _int64_as_numbers(message, data: dict) -> dict:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        repeated = field.is_repeated
        if field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in data[field.name]] if repeated else int(data[field.name])
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.fields:
            value = getattr(message, field.name)
            if repeated:
                data[field.name] = [_int64_as_numbers(m, d) for m, d in zip(value, data[field.name], strict=True)]
            else:
                data[field.name] = _int64_as_numbers(value, data[field.name])
    return data


def _channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = max_message_mb << 20
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def _credentials(tls: bool, root_certificates: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None


class _Common:
    def __init__(self, target: str, api_key: str | None, timeout: float | None):
        self.target = target
        self.timeout = timeout
        self._metadata = (("x-api-key", api_key),) if api_key else ()


class LipSyncClient(_Common):
    """Blocking client. ``timeout`` (seconds) applies to unary calls; streams run until they end."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = 60.0, max_message_mb: int = 64):
        super().__init__(target, api_key, timeout)
        credentials = _credentials(tls, root_certificates)
        options = _channel_options(max_message_mb)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.LipSyncStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LipSyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        return method(request, timeout=self.timeout, metadata=self._metadata)

    def generate_frame(self, model: str, frame_id: int, audio: AudioLike = None, **output) -> pb.Frame:
        return self._call(self.stub.GenerateFrame, frame_request(model, frame_id, audio, **output))

    def generate_batch(self, items: Iterable[pb.GenerateFrameRequest]) -> list[pb.BatchItemResult]:
        """Items from ``frame_request(...)``; one result per item (a frame or an error), in order."""
        return list(self._call(self.stub.GenerateBatch, pb.GenerateBatchRequest(items=list(items))).results)

    def stream_frames(self, model: str, first: int = 0, last: int | None = None, audio: AudioLike = None,
                      **options) -> FrameStream:
        return self.stub.StreamFrames(stream_frames_request(model, first, last, audio, **options),
                                      metadata=self._metadata)

    def stream_audio(self, model: str, chunks: Iterable[bytes], sample_rate: int = 16000, channels: int = 1,
                     **output) -> FrameStream:
        """Send PCM16 chunks as they come (e.g. from a microphone); frames come back as they are ready."""

        def requests():
            yield stream_audio_config(model, sample_rate, channels, **output)
            for chunk in chunks:
                yield pb.StreamAudioRequest(pcm16=bytes(chunk))

        return self.stub.StreamAudio(requests(), metadata=self._metadata)

    def session(self, model: str, *, unpaced: bool = False, **output) -> LiveSession:
        """A live avatar session (see the module's docstring)."""
        return LiveSession(self.stub, session_config(model, unpaced=unpaced, **output), self._metadata)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def load_model(self, name: str, version: str | None = None) -> pb.LoadModelResponse:
        return self._call(self.stub.LoadModel, pb.LoadModelRequest(name=name, version=version or ""))

    def unload_model(self, name: str) -> bool:
        return self._call(self.stub.UnloadModel, pb.UnloadModelRequest(name=name)).unloaded

    def list_registry(self) -> pb.ListRegistryResponse:
        return self._call(self.stub.ListRegistry, pb.ListRegistryRequest())

    def get_stats(self) -> pb.GetStatsResponse:
        return self._call(self.stub.GetStats, pb.GetStatsRequest())

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... for the server ("") or a model name."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncLipSyncClient(_Common):
    """asyncio client (grpc.aio); create it inside a running event loop."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = 60.0, max_message_mb: int = 64):
        super().__init__(target, api_key, timeout)
        credentials = _credentials(tls, root_certificates)
        options = _channel_options(max_message_mb)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.LipSyncStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLipSyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request):
        return await method(request, timeout=self.timeout, metadata=self._metadata)

    async def generate_frame(self, model: str, frame_id: int, audio: AudioLike = None, **output) -> pb.Frame:
        return await self._call(self.stub.GenerateFrame, frame_request(model, frame_id, audio, **output))

    async def generate_batch(self, items: Iterable[pb.GenerateFrameRequest]) -> list[pb.BatchItemResult]:
        response = await self._call(self.stub.GenerateBatch, pb.GenerateBatchRequest(items=list(items)))
        return list(response.results)

    async def stream_frames(self, model: str, first: int = 0, last: int | None = None, audio: AudioLike = None,
                            **options) -> AsyncIterator[pb.Frame]:
        call = self.stub.StreamFrames(stream_frames_request(model, first, last, audio, **options),
                                      metadata=self._metadata)
        async for frame in call:
            yield frame

    async def stream_audio(self, model: str, chunks: AsyncIterable[bytes] | Iterable[bytes],
                           sample_rate: int = 16000, channels: int = 1, **output) -> AsyncIterator[pb.Frame]:
        async def requests():
            yield stream_audio_config(model, sample_rate, channels, **output)
            if hasattr(chunks, "__aiter__"):
                async for chunk in chunks:
                    yield pb.StreamAudioRequest(pcm16=bytes(chunk))
            else:
                for chunk in chunks:
                    yield pb.StreamAudioRequest(pcm16=bytes(chunk))

        async for frame in self.stub.StreamAudio(requests(), metadata=self._metadata):
            yield frame

    def session(self, model: str, *, unpaced: bool = False, **output) -> AsyncLiveSession:
        """A live avatar session: ``async with client.session("demo") as s: ... async for r in s: ...``."""
        return AsyncLiveSession(self.stub, session_config(model, unpaced=unpaced, **output), self._metadata)

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def load_model(self, name: str, version: str | None = None) -> pb.LoadModelResponse:
        return await self._call(self.stub.LoadModel, pb.LoadModelRequest(name=name, version=version or ""))

    async def unload_model(self, name: str) -> bool:
        return (await self._call(self.stub.UnloadModel, pb.UnloadModelRequest(name=name))).unloaded

    async def list_registry(self) -> pb.ListRegistryResponse:
        return await self._call(self.stub.ListRegistry, pb.ListRegistryRequest())

    async def get_stats(self) -> pb.GetStatsResponse:
        return await self._call(self.stub.GetStats, pb.GetStatsRequest())

    async def health(self, service: str = "") -> str:
        response = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
