"""The /ws protocol: JSON text messages both ways, binary messages for live PCM16 audio.

Client -> server (every message may carry a ``request_id``, string or integer, echoed on its replies):

- ``{"type": "frame", "model_name", "frame_id", "audio_override"?, "format"?, "region"?, "jpeg_quality"?}``
  -> one ``{"type": "frame", ...}`` (the fields of POST /generate/frame's response);
- ``{"type": "stream", "model_name", "first"?, "last"?, "realtime"?, "fps"?, "audio_override"?, output
  fields}`` -> frame messages first..last in order, then ``{"type": "end", "frames": n}``;
- ``{"type": "audio_start", "model_name", "sample_rate"?, "channels"?, output fields}``, then binary
  messages of 16-bit little-endian PCM, then ``{"type": "audio_end"}`` -> frame messages as soon as each
  frame's audio window is complete (``pipeline.live``), then ``{"type": "end", "frames": n}``;
- ``{"type": "session_start", "model_name", "sample_rate"?, "channels"?, "unpaced"?, output fields}`` opens
  the socket's live session (``serving.session``): ``{"type": "session_started", ...}``, then one
  ``{"type": "session_frame", "tick", "pts", "kind", "audio" (base64 PCM16), frame fields}`` per tick until
  it ends; binary messages are its audio, ``{"type": "clear"}`` is answered by ``{"type": "cleared", ...}``,
  ``{"type": "flush"}`` by ``{"type": "playback_finished", ...}`` once its audio has played, and
  ``{"type": "session_end"}`` by ``{"type": "session_ended", "reason": "ended", ...}``; a pod that drains
  ends its sessions with ``{"type": "session_ended", "reason": "draining", ...}``. A session past the pod's
  --max-sessions is an error message (RESOURCE_EXHAUSTED, ``"http_status": 429``) and the socket closes
  (1013, try again later), so the client can try another pod;
- ``{"type": "ping"}`` -> ``{"type": "pong"}`` (browsers cannot send WebSocket pings).

Each operation runs as its own task in the server's request scope (GenerateFrame, StreamFrames,
StreamAudio), so several requests on one socket are batched together on the device, replies to different
operations may interleave (``request_id`` tells them apart), and draining, metrics and errors are gRPC's. A
failed operation answers ``{"type": "error", "code", "message"}`` and the socket stays open; only a
message over the size limit closes it (1009), as the WebSocket protocol requires.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import WSCloseCode, WSMsgType, web

from inference_pod.api.http.shapes import (
    FRAME_FIELDS,
    OUTPUT_FIELDS,
    audio_override,
    field,
    frame_id,
    frame_json,
    frame_request,
    output_spec,
    parse_json,
    reject_unknown,
)
from inference_pod.core.live_features import pcm_slices
from inference_pod.errors import InvalidInput, Overloaded, echo, reply_for
from inference_pod.serving.data_plane import DataPlane
from inference_pod.serving.session import (
    CONFIG_FIRST,
    AudioChunk,
    Clear,
    Cleared,
    End,
    Ended,
    Flush,
    PlaybackFinished,
    SessionConfig,
    SessionFrame,
    SessionInput,
    SessionOutput,
    Started,
)


class Authenticator(Protocol):
    def __call__(self, key: str | None, method: str) -> None: ...

log = logging.getLogger(__name__)

# Operations one socket runs at once; past this the socket is not read until one ends, which pushes back
# on the client through TCP instead of queueing without bound.
MAX_OPERATIONS = 32
# PCM buffered for a live session before the socket stops being read: slices, not messages, so at most
# 32 x 16 KiB beside the message being read, however large the client's messages are.
AUDIO_QUEUE_SLICES = 32
COMMON_FIELDS = frozenset({"type", "request_id"})
STREAM_FIELDS = COMMON_FIELDS | FRAME_FIELDS - {"frame_id"} | {"first", "last", "realtime", "fps"}
AUDIO_START_FIELDS = COMMON_FIELDS | OUTPUT_FIELDS | {"model_name", "sample_rate", "channels"}
SESSION_START_FIELDS = AUDIO_START_FIELDS | {"unpaced"}
# Binary audio with nothing open: a session's words (as on gRPC), and the older audio_start's way named too.
BINARY_FIRST = f"{CONFIG_FIRST} (or after audio_start, for a plain audio stream)"
METHODS = {"frame": "GenerateFrame", "stream": "StreamFrames", "audio_start": "StreamAudio",
           "session_start": "Session"}


class LiveAudio:
    """The PCM chunks of the socket's open audio session, handed from the reader to the session's task."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(AUDIO_QUEUE_SLICES)
        self.failed = False

    async def chunks(self):
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    def fail(self) -> None:
        """The session ended early: drop what is queued (unblocking the reader) and whatever comes next."""
        self.failed = True
        while not self.queue.empty():
            self.queue.get_nowait()


class LiveSession:
    """The socket's open avatar session: its inputs, in order, handed from the reader to the session's task."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[SessionInput] = asyncio.Queue(AUDIO_QUEUE_SLICES)
        self.done = False

    async def inputs(self):
        while not isinstance(message := await self.queue.get(), End):
            yield message

    def stop(self) -> None:
        """The session is over: drop what is queued (unblocking the reader) and whatever comes next."""
        self.done = True
        while not self.queue.empty():
            self.queue.get_nowait()

    async def put(self, message: SessionInput) -> None:
        if not self.done:
            await self.queue.put(message)


def session_output_json(output: SessionOutput) -> dict[str, Any]:
    if isinstance(output, SessionFrame):
        return {"type": "session_frame", "tick": output.tick, "pts": output.pts, "kind": output.kind,
                "audio": base64.b64encode(output.audio).decode("ascii"), **frame_json(output.result)}
    if isinstance(output, Started):
        fields = dataclasses.asdict(output)
        fields["model_version"] = fields.pop("version")
        return {"type": "session_started", **fields}
    if isinstance(output, Cleared):
        return {"type": "cleared", **dataclasses.asdict(output)}
    if isinstance(output, PlaybackFinished):
        return {"type": "playback_finished", **dataclasses.asdict(output)}
    assert isinstance(output, Ended)
    return {"type": "session_ended", "ticks": output.ticks, "frames": output.frames, "dropped": output.dropped,
            "reason": output.reason}


class WebSocketSession:
    def __init__(self, data_plane: DataPlane, authenticate: Authenticator, ws: web.WebSocketResponse,
                 api_key: str | None):
        self.data_plane = data_plane
        self.authenticate = authenticate  # the gateway's: the HTTP wording of a missing key
        self.ws = ws
        self.api_key = api_key
        self._send_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_OPERATIONS)
        self._tasks: set[asyncio.Task] = set()
        self._audio: LiveAudio | None = None
        self._session: LiveSession | None = None

    async def run(self) -> None:
        try:
            async for message in self.ws:
                if message.type == WSMsgType.TEXT:
                    await self._on_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._on_binary(message.data)
                elif message.type == WSMsgType.ERROR:  # e.g. over max_msg_size: aiohttp has closed it (1009)
                    log.info("WebSocket closed: %s", self.ws.exception())
        except ConnectionError:  # a reply to the peer failed: it is gone
            pass
        finally:  # the client is gone: nobody is left to read what its operations would send
            if self._audio is not None:
                self._audio.fail()
            if self._session is not None:
                self._session.stop()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -------------------------------------------------------------------------------------- incoming

    async def _on_text(self, text: str) -> None:
        request_id = None
        try:
            message = parse_json(text, "the message")
            request_id = field(message, "request_id", (str, int), None)
            kind = field(message, "type", str)
        except InvalidInput as exc:
            await self._send_error(exc.grpc_status, str(exc), request_id)
            return
        if kind == "ping":
            await self._send({"type": "pong"}, request_id)
        elif kind == "frame":
            await self._spawn(functools.partial(self._frame, message, request_id), kind, request_id)
        elif kind == "stream":
            await self._spawn(functools.partial(self._stream, message, request_id), kind, request_id)
        elif kind == "session_start":
            session_open = self._session is not None and not self._session.done
            if session_open or (self._audio is not None and not self._audio.failed):
                await self._send_error("INVALID_ARGUMENT", "a session or an audio stream is already open on this "
                                       "socket: one at a time (session_end / audio_end first)", request_id)
                return
            session = self._session = LiveSession()
            await self._spawn(functools.partial(self._live_session, message, session, request_id), kind,
                              request_id, on_error=session.stop)
        elif kind in ("clear", "flush", "session_end"):
            open_session = self._session
            if open_session is None or open_session.done:
                await self._send_error("INVALID_ARGUMENT", CONFIG_FIRST, request_id)
                return
            if kind == "session_end":
                self._session = None
            control: dict[str, SessionInput] = {"clear": Clear(), "flush": Flush(), "session_end": End()}
            await open_session.put(control[kind])
        elif kind == "audio_start":
            if self._session is not None and not self._session.done:
                await self._send_error("INVALID_ARGUMENT", "a session is open on this socket: session_end before "
                                       "audio_start", request_id)
                return
            if self._audio is not None and not self._audio.failed:
                await self._send_error("INVALID_ARGUMENT", "an audio session is already open: send audio_end "
                                       "before starting another", request_id)
                return
            started = self._audio = LiveAudio()  # replaces a failed session whose audio_end never came
            await self._spawn(functools.partial(self._live, message, started, request_id), kind, request_id,
                              on_error=started.fail)
        elif kind == "audio_end":
            live, self._audio = self._audio, None
            if live is None:
                await self._send_error("INVALID_ARGUMENT", "audio_end without an open audio session", request_id)
            elif not live.failed:
                await live.queue.put(None)
        else:
            await self._send_error("INVALID_ARGUMENT", f"unknown message type {echo(kind)}: expected frame, stream, "
                                   "audio_start, audio_end, session_start, clear, flush, session_end or ping", request_id)

    async def _on_binary(self, data: bytes) -> None:
        session = self._session
        if session is not None and not session.done:
            await session.put(AudioChunk(data))  # the session works it in slices
            return
        live = self._audio
        if live is None:  # the words of every message that comes before its session's start, on both doors
            await self._send_error("INVALID_ARGUMENT", BINARY_FIRST, None)
        else:
            for piece in pcm_slices(data):
                if live.failed:  # after a failed session the rest of its audio is dropped until audio_end
                    break
                await live.queue.put(piece)

    async def _spawn(self, operation: Callable[[], Awaitable[None]], kind: str, request_id, on_error=None) -> None:
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._guarded(operation, METHODS[kind], request_id, on_error))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _guarded(self, operation: Callable[[], Awaitable[None]], method: str, request_id,
                       on_error: Callable[[], None] | None) -> None:
        """One operation, in the request scope; its failure is an error message, never the socket's end
        (except a session refused for capacity: the client should try another pod, so the socket closes)."""
        try:
            self.authenticate(self.api_key, method)  # a key revoked while the socket stays open
            async with self.data_plane.request_scope(method):
                await operation()
        except asyncio.CancelledError:
            raise
        except ConnectionError:  # the socket closed under a send: nobody to tell
            pass
        except Exception as exc:
            if on_error is not None:
                on_error()
            reply = reply_for(exc, f"WebSocket {method}")
            if method == "Session" and isinstance(exc, Overloaded):
                with contextlib.suppress(ConnectionError):
                    await self._send({"type": "error", "code": reply.code, "http_status": reply.http_status,
                                      "message": reply.message}, request_id)
                await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many sessions")
                return
            await self._send_error(reply.code, reply.message, request_id)

    # -------------------------------------------------------------------------------------- operations

    async def _frame(self, message: dict, request_id) -> None:
        item = frame_request(message, COMMON_FIELDS, "a frame message")
        await self._send(frame_json(await self.data_plane.frame(item)), request_id, "frame")

    async def _stream(self, message: dict, request_id) -> None:
        reject_unknown(message, STREAM_FIELDS, "a stream message")
        model = field(message, "model_name", str)
        first, last = frame_id(message, "first", 0), frame_id(message, "last", None)
        realtime, fps = field(message, "realtime", bool, False), field(message, "fps", (int, float), 0.0)
        audio, output = audio_override(message), output_spec(message)
        frames = 0
        async for result in self.data_plane.stream(model, first, last, audio, output, realtime=realtime,
                                                   fps=float(fps)):
            await self._send(frame_json(result), request_id, "frame")
            frames += 1
        await self._send({"type": "end", "frames": frames}, request_id)

    async def _live(self, message: dict, live: LiveAudio, request_id) -> None:
        reject_unknown(message, AUDIO_START_FIELDS, "an audio_start message")
        model = field(message, "model_name", str)
        sample_rate, channels = field(message, "sample_rate", int, 16000), field(message, "channels", int, 1)
        output = output_spec(message)
        frames = 0
        async for result in self.data_plane.live(model, sample_rate, channels, live.chunks(), output):
            await self._send(frame_json(result), request_id, "frame")
            frames += 1
        await self._send({"type": "end", "frames": frames}, request_id)

    async def _live_session(self, message: dict, session: LiveSession, request_id) -> None:
        reject_unknown(message, SESSION_START_FIELDS, "a session_start message")
        config = SessionConfig(field(message, "model_name", str), output_spec(message),
                               field(message, "sample_rate", int, 16000), field(message, "channels", int, 1),
                               paced=not field(message, "unpaced", bool, False))
        try:
            async for output in self.data_plane.session(config, session.inputs()):
                await self._send(session_output_json(output), request_id)
        finally:
            session.stop()

    # -------------------------------------------------------------------------------------- outgoing

    async def _send(self, body: dict[str, Any], request_id, kind: str | None = None) -> None:
        message = {"type": kind, **body} if kind else dict(body)
        if request_id is not None:
            message["request_id"] = request_id
        text = json.dumps(message)
        async with self._send_lock:  # one message at a time on the wire, whichever operation sends it
            await self.ws.send_str(text)

    async def _send_error(self, code: str, message: str, request_id) -> None:
        try:
            await self._send({"type": "error", "code": code, "message": message}, request_id)
        except ConnectionError:
            pass
