"""How ``lipsync bench sessions`` reaches a pod's live sessions: a small interface, and its gRPC transport.

The benchmark drives sessions and measures what comes back through this interface only: gRPC (a frame
carries its audio) and WebRTC (issue 19: decoded video and audio on their own tracks, paired here by RTP
time), each one class here and one name in ``TRANSPORTS``. A transport turns what its wire carries into the events below; every time in the benchmark
is the client's ``time.perf_counter()`` when the event arrived, taken by the benchmark, not the transport.

A transport that cannot tell a frame's kind (a video track carries pixels only) gives ``kind=None``; the
benchmark then counts kinds from ``SessionEnded`` alone. A frame's ``audio`` is the PCM16 that plays with it
and ``pts`` its presentation time: a transport with separate tracks pairs them by their own timestamps, and
the benchmark's timestamp offset (audio position against pts) measures how well it did.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import av
import grpc
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from inference_pod.bench.webrtc_receiver import VIDEO_CLOCK, OfferRefused, WebRtcReceiver
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




# ------------------------------------------------------------------------------------------ WebRTC


class _BenchReceiver(WebRtcReceiver):
    """A viewer that keeps no decoded images (a level's frames would fill the memory): each decoded video
    frame's RTP timestamp and arrival go to ``frames``, the decoded audio to ``audio`` (48 kHz, by RTP time),
    every data channel event to ``events``; ``changed`` wakes the connection's reader."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.frames: collections.deque[int] = collections.deque()  # RTP at 90 kHz, from the first frame
        self.audio = bytearray()  # decoded audio from the track's first packet, 48 kHz mono PCM16
        self.audio_decoded = 0  # samples decoded (the timeline above may hold gaps as silence)
        self.first_audio_pts: int | None = None
        self.first_video_pts: int | None = None
        self.channel.on("close", self._changed.set)  # the pod closed the connection: the reader must notice
        self.pc.on("connectionstatechange", self._changed.set)

    @property
    def gone(self) -> str | None:
        """Why nothing more can arrive (the connection failed or closed, the data channel closed), or None."""
        if self.pc.connectionState in ("failed", "closed"):
            return f"the peer connection {self.pc.connectionState}"
        if self.channel.readyState == "closed":
            return "the data channel closed"
        return None

    async def changed(self) -> None:
        """Until something more arrives."""
        self._changed.clear()
        await self._changed.wait()

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()  # decoded by aiortc (its decoder thread), as a player's would be
                pts = int(frame.pts or 0)
                if isinstance(frame, av.VideoFrame):
                    if self.first_video_pts is None:
                        self.first_video_pts = pts
                    self.frames.append(pts - self.first_video_pts)
                elif isinstance(frame, av.AudioFrame):
                    if self.first_audio_pts is None:
                        self.first_audio_pts = pts
                    samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1)
                    at = 2 * (pts - self.first_audio_pts)
                    if at > len(self.audio):
                        self.audio.extend(bytes(at - len(self.audio)))
                    self.audio[at : at + 2 * len(samples)] = samples.astype("<i2").tobytes()
                    self.audio_decoded += len(samples)
                self._changed.set()


class WebRtcConnection:
    """One session over ``POST /webrtc/offer``, received and decoded by an aiortc peer on this machine.

    The tracks carry no frame kinds (``kind=None``: the counts come from ``session_ended``). A decoded video
    frame becomes a ``Frame`` once the decoded audio covers its tick, as a player shows them together: its
    tick and ``pts`` from its RTP timestamp, mapped through ``media_started`` (the tick both tracks' first
    packets carry), its ``audio`` the decoded samples whose RTP time falls in that tick. The benchmark's
    timestamp offset then compares the decoded audio's position with the video's RTP time."""

    def __init__(self, base_url: str, model: str, api_key: str | None, options: dict[str, Any]):
        self.receiver = _BenchReceiver(base_url, model, api_key=api_key, **options)
        self._closing: asyncio.Task | None = None

    async def send_audio(self, pcm16: bytes) -> None:
        if self._open():
            self.receiver.send_pcm(pcm16)

    async def flush(self) -> None:
        if self._open():
            self.receiver.send("flush")

    async def clear(self) -> None:
        if self._open():
            self.receiver.send("clear")

    async def end(self) -> None:
        if self._open():
            self.receiver.send("session_end")

    def _open(self) -> bool:
        """Whether the data channel takes messages; when it is gone, the events say so (SessionFailed)."""
        return self.receiver.channel.readyState == "open"

    def cancel(self) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.receiver.close())

    async def closed(self) -> None:
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    async def events(self) -> AsyncIterator[SessionEvent]:
        receiver = self.receiver
        try:
            await receiver.connect()
        except OfferRefused as exc:
            if exc.status == 429:
                raise SessionRefused(str(exc)) from None
            raise SessionFailed(str(exc)) from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise SessionFailed(f"WebRTC: {type(exc).__name__}: {exc}") from None
        seen_events = 0
        started: Started | None = None
        media: dict[str, Any] | None = None
        while True:
            events = receiver.received.events
            while seen_events < len(events):
                body = events[seen_events]
                seen_events += 1
                kind = body.get("type")
                if kind == "session_started":
                    started = Started(body["fps"], body["samples_per_tick"], body["lookahead_s"])
                    yield started
                elif kind == "media_started":
                    media = body
                elif kind == "cleared":
                    yield Cleared(body["tick"], body["played_samples"], body["dropped_samples"])
                elif kind == "playback_finished":
                    yield PlaybackFinished(body["utterance"], body["tick"])
                elif kind == "error":
                    raise SessionFailed(f"{body.get('code')}: {body.get('message')}")
                elif kind == "session_ended":
                    if started is not None and media is not None:
                        for frame in self._frames(started, media, final=True):
                            yield frame
                    yield Ended(body["ticks"], dict(body["frames"]), body["dropped"])
                    return
            if started is not None and media is not None:
                for frame in self._frames(started, media, final=False):
                    yield frame
            if receiver.gone:
                raise SessionFailed(f"WebRTC: {receiver.gone} before session_ended")
            await receiver.changed()

    def _frames(self, started: Started, media: dict[str, Any], final: bool) -> list[Frame]:
        """The decoded video frames whose tick's audio has been decoded (all of them when ``final``)."""
        receiver = self.receiver
        out = []
        per_tick_48k = started.samples_per_tick * 3  # Opus runs at 48 kHz; the session at 16 kHz
        while receiver.frames:
            rtp = receiver.frames[0]
            offset = round(rtp * started.fps / VIDEO_CLOCK)  # ticks after media_started's
            begin, end = offset * per_tick_48k, (offset + 1) * per_tick_48k
            if not final and len(receiver.audio) < 2 * end:  # bytes
                break  # its audio has not arrived yet: a player would wait for it too
            receiver.frames.popleft()
            pcm = np.frombuffer(bytes(receiver.audio[2 * begin : 2 * end]), "<i2")[::3]  # back to 16 kHz
            out.append(Frame(media["tick"] + offset, media["pts"] + rtp / VIDEO_CLOCK, None, False,
                             pcm.tobytes()))
        return out


class WebRtcTransport:
    """``POST /webrtc/offer`` on a pod's HTTP gateway (``target``: its base URL); every session its own peer
    connection, received and decoded in this process. ``options``: codec, width, height, bitrate_kbps."""

    name = "webrtc"

    def __init__(self, target: str, api_key: str | None = None, **options: Any):
        self.base_url = target if "://" in target else f"http://{target}"
        self.api_key = api_key
        self.options = {k: v for k, v in options.items() if v is not None}
        self._connections: list[WebRtcConnection] = []

    def open(self, model: str, *, keep_images: bool = False) -> WebRtcConnection:
        connection = WebRtcConnection(self.base_url, model, self.api_key, self.options)  # images: never kept
        self._connections.append(connection)
        return connection

    async def __aenter__(self) -> WebRtcTransport:
        for chatty in ("aioice", "aiortc"):  # every ICE check at INFO: a level's sessions would fill the terminal
            logging.getLogger(chatty).setLevel(logging.WARNING)
        return self

    async def __aexit__(self, *exc) -> None:
        for connection in self._connections:
            connection.cancel()
            await connection.closed()
        self._connections.clear()


# Name -> factory(target, api_key, **options): gRPC takes a HOST:PORT, WebRTC the HTTP gateway's URL and its
# video options (codec, width, height, bitrate_kbps).
TRANSPORTS: dict[str, Callable[..., SessionTransport]] = {
    "grpc": lambda target, api_key=None, **options: GrpcTransport(target, api_key),
    "webrtc": WebRtcTransport,
}


def transport(name: str, target: str, api_key: str | None = None, **options: Any) -> SessionTransport:
    try:
        factory = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose from {', '.join(TRANSPORTS)}") from None
    return factory(target, api_key, **options)
