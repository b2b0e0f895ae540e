"""How ``lipsync bench sessions`` reaches a pod's live sessions: a small interface, and its gRPC transport.

The benchmark drives sessions and measures what comes back through this interface only, so another way in
(WebRTC, issue 19: audio and video on their own tracks) is one more class here and one more name in
``TRANSPORTS``. A transport turns what its wire carries into the events below; every time in the benchmark
is the client's ``time.perf_counter()`` when the event arrived, taken by the benchmark, not the transport.

A transport that cannot tell a frame's kind (a video track carries pixels only) gives ``kind=None``; the
benchmark then counts kinds from ``SessionEnded`` alone. A frame's ``audio`` is the PCM16 that plays with it
and ``pts`` its presentation time: a transport with separate tracks pairs them by their own timestamps, and
the benchmark's timestamp offset (audio position against pts) measures how well it did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from inference_pod.client import AsyncLipSyncClient, AsyncLiveSession
from lipsync.v1 import lipsync_pb2 as pb

# ------------------------------------------------------------------------------------------ what comes back


@dataclass(frozen=True)
class Started:
    fps: int
    samples_per_tick: int
    lookahead_s: float


@dataclass(frozen=True)
class Frame:
    tick: int
    pts: float  # seconds in the session's timeline
    kind: str | None  # speaking, idle or repeated; None when the transport cannot tell
    cached: bool  # an idle frame from the pod's idle cache: no network call
    audio: bytes  # PCM16 16 kHz mono that plays with this frame
    image: bytes = b""  # the encoded image, when the caller asked to keep images
    image_format: str = "jpeg"
    size: tuple[int, int] = (0, 0)  # width, height
    crop_box: tuple[int, int, int, int, int] | None = None  # x1, y1, x2, y2, size


@dataclass(frozen=True)
class Cleared:
    tick: int  # the last tick emitted before the clear; the next one should be idle
    played_samples: int
    dropped_samples: int


@dataclass(frozen=True)
class PlaybackFinished:
    utterance: int
    tick: int


@dataclass(frozen=True)
class Ended:
    ticks: int
    frames: dict[str, int] = field(default_factory=dict)  # speaking, idle_cached, idle_computed, repeated
    dropped: int = 0


SessionEvent = Started | Frame | Cleared | PlaybackFinished | Ended


class SessionRefused(Exception):
    """The pod runs its maximum of sessions (RESOURCE_EXHAUSTED / 429): the client would try another pod."""


class SessionFailed(Exception):
    """The session ended with an error (its code or words in the message)."""


# ------------------------------------------------------------------------------------------ the interface


class SessionConnection(Protocol):
    """One running session: send while iterating its events."""

    async def send_audio(self, pcm16: bytes) -> None: ...
    async def flush(self) -> None: ...
    async def clear(self) -> None: ...
    async def end(self) -> None: ...  # the pod ends the session: Ended, then the events stop
    def cancel(self) -> None: ...
    def events(self) -> AsyncIterator[SessionEvent]: ...  # raises SessionRefused or SessionFailed


class SessionTransport(Protocol):
    """A way into one pod's sessions; ``async with`` it, inside the event loop that runs the sessions."""

    name: str

    def open(self, model: str, *, keep_images: bool = False) -> SessionConnection: ...
    async def __aenter__(self) -> SessionTransport: ...
    async def __aexit__(self, *exc) -> None: ...


# ------------------------------------------------------------------------------------------ gRPC


KINDS = {pb.FRAME_KIND_IDLE: "idle", pb.FRAME_KIND_SPEAKING: "speaking", pb.FRAME_KIND_REPEATED: "repeated"}
FORMATS = {pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_PNG: "png", pb.IMAGE_FORMAT_RAW: "raw",
           pb.IMAGE_FORMAT_UNSPECIFIED: "jpeg"}


class GrpcConnection:
    def __init__(self, session: AsyncLiveSession, keep_images: bool):
        self._session = session
        self._keep_images = keep_images

    async def send_audio(self, pcm16: bytes) -> None:
        await self._session.send_audio(pcm16)

    async def flush(self) -> None:
        await self._session.flush()

    async def clear(self) -> None:
        await self._session.clear()

    async def end(self) -> None:
        await self._session.end()

    def cancel(self) -> None:
        self._session.cancel()

    async def events(self) -> AsyncIterator[SessionEvent]:
        try:
            async for response in self._session:
                event = self._event(response)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise SessionRefused(exc.details()) from None
            raise SessionFailed(f"{exc.code().name}: {exc.details()}") from None

    def _event(self, response: pb.SessionResponse) -> SessionEvent | None:
        which = response.WhichOneof("message")
        if which == "frame":
            f = response.frame
            box = f.frame.crop_box
            return Frame(f.tick, f.pts, KINDS.get(f.kind), f.frame.cached, f.audio,
                         f.frame.image if self._keep_images else b"", FORMATS.get(f.frame.format, "jpeg"),
                         (f.frame.width, f.frame.height), (box.x1, box.y1, box.x2, box.y2, box.size))
        if which == "started":
            s = response.started
            return Started(s.fps, s.samples_per_tick, s.lookahead_s)
        if which == "cleared":
            c = response.cleared
            return Cleared(c.tick, c.played_samples, c.dropped_samples)
        if which == "playback_finished":
            return PlaybackFinished(response.playback_finished.utterance, response.playback_finished.tick)
        if which == "ended":
            e = response.ended
            return Ended(e.ticks, {"speaking": e.speaking_frames, "idle_cached": e.idle_cached_frames,
                                   "idle_computed": e.idle_computed_frames, "repeated": e.repeated_frames},
                         e.dropped_frames)
        return None


class GrpcTransport:
    """The ``Session`` RPC through ``AsyncLipSyncClient``: one channel for every session of the run."""

    name = "grpc"

    def __init__(self, target: str, api_key: str | None = None):
        self.target = target
        self.api_key = api_key
        self._client: AsyncLipSyncClient | None = None

    def open(self, model: str, *, keep_images: bool = False) -> GrpcConnection:
        if self._client is None:
            raise RuntimeError("use the transport inside `async with`")
        return GrpcConnection(self._client.session(model), keep_images)

    async def __aenter__(self) -> GrpcTransport:
        self._client = AsyncLipSyncClient(self.target, api_key=self.api_key, timeout=None)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# Name -> factory(target, api_key). WebRTC (issue 19) adds its own here.
TRANSPORTS = {"grpc": GrpcTransport}


def transport(name: str, target: str, api_key: str | None = None) -> SessionTransport:
    try:
        return TRANSPORTS[name](target, api_key)
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose from {', '.join(TRANSPORTS)}") from None
