"""POST /webrtc/offer: a live session (``serving.session``) over WebRTC, with aiortc.

The client sends an SDP offer that receives video (and audio), optionally sends a microphone track, and may
open a data channel; the pod answers, and from then on one ``DataPlane.session`` runs per peer connection:

- the **video track** carries the session's frames at the model's fps, encoded here (H.264 or VP8, whichever
  the offer prefers unless ``codec`` says) on the pod's WebRTC encode threads (``--webrtc-encode-threads``),
  never on the event loop. The RTP timestamp of tick k is k / fps (90 kHz clock);
- the **audio track** carries the audio the session returns (its 16 kHz PCM, resampled to 48 kHz Opus by
  aiortc) with the RTP timestamp of the same tick, so the browser's player keeps them in sync;
- the client's **microphone track**, when it sends one, is the session's audio input (resampled to 16 kHz);
- the **data channel** (any label) takes ``{"type": "clear"}``, ``{"type": "flush"}``, ``{"type":
  "session_end"}`` and binary PCM16 (16 kHz mono) pushed instead of a microphone, and carries the session's
  events as JSON: ``session_started``, ``media_started`` (the first tick both tracks carry: the receiver's
  first RTP timestamp is that tick), ``cleared``, ``playback_finished``, ``session_ended``, ``error``.

Frames are taken from the session as raw pixels (``format: raw``): measured on the project's 2-core machine,
JPEG would cost an encode in the pod and a decode here before the video encoder, for nothing. A peer that
cannot take frames at the session's pace loses its own oldest unencoded frames (the video track keeps the
newest two); the session and every other peer keep their pace. The session ends when the peer connection
closes or fails (a peer that answers no ICE consent check for ``--webrtc-consent-expiry-s`` is gone:
``webrtc_consent``), when it never connects (CONNECT_TIMEOUT_S), on ``session_end``, or when the pod stops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from inference_pod.api.http.shapes import field, reject_unknown
from inference_pod.api.http.webrtc_consent import keep_consent
from inference_pod.api.http.websocket import session_output_json
from inference_pod.core.encoding import OutputSpec
from inference_pod.errors import InvalidInput, LipSyncError, echo, reply_for
from inference_pod.serving.data_plane import DataPlane
from inference_pod.serving.session import (
    AudioChunk,
    Clear,
    End,
    Ended,
    Flush,
    SessionConfig,
    SessionFrame,
    SessionInput,
    Started,
)
from inference_pod.serving.settings import split_ice_server

log = logging.getLogger(__name__)

OFFER_FIELDS = frozenset({"model_name", "sdp", "type", "codec", "width", "height", "bitrate_kbps", "unpaced"})
CODECS = {"h264": "video/H264", "vp8": "video/VP8"}
# Measured on the project's 2-core machine (python -m inference_pod.bench.webrtc_encoding): at 1280x720 and
# 1.5 Mbit/s, x264 "veryfast" costs about 14 ms a frame like "ultrafast" (and compresses better), libx264's
# default "medium" (aiortc's own encoder's) about 32 ms; VP8 realtime about 11 ms.
DEFAULT_BITRATE_KBPS = 1500
MIN_BITRATE_KBPS, MAX_BITRATE_KBPS = 100, 20000
MAX_WIDTH, MAX_HEIGHT = 3840, 2160
X264_PRESET = "veryfast"
VP8_SPEED = "8"  # libvpx cpu-used for realtime: higher is faster and coarser
KEYFRAME_INTERVAL_S = 2.0  # a receiver that lost a packet, or joined late, recovers within this
VIDEO_QUEUE_FRAMES = 2  # unencoded frames a slow peer may have waiting; older ones are dropped
AUDIO_QUEUE_FRAMES = 100  # 2 s of 20 ms audio frames
AUDIO_FRAME_SAMPLES = 320  # 20 ms at 16 kHz: one Opus packet each
INPUT_QUEUE_MESSAGES = 1024  # control messages and audio chunks not yet taken by the session
CONNECT_TIMEOUT_S = 30.0  # an answered offer whose peer never connects frees its session slot after this
CLOSE_DRAIN_S = 2.0  # after the session ends, how long its last events get to leave before the connection closes


@dataclass(frozen=True)
class VideoOptions:
    codec: str | None  # h264, vp8, or None: the offer's preference
    width: int | None  # None: the model's frame size
    height: int | None
    bitrate_kbps: int


def offer_request(body: dict[str, Any]) -> tuple[str, str, VideoOptions, bool]:
    """(model, offer SDP, video options, paced) from the body of POST /webrtc/offer."""
    reject_unknown(body, OFFER_FIELDS, "a WebRTC offer")
    model = field(body, "model_name", str)
    sdp = field(body, "sdp", str)
    kind = field(body, "type", str)
    if kind != "offer":
        raise InvalidInput(f"'type' must be \"offer\" (the pod answers), got {echo(kind)}")
    codec = field(body, "codec", str, None)
    if codec is not None and codec not in CODECS:
        raise InvalidInput(f"'codec' must be one of {', '.join(CODECS)}, got {echo(codec)}")
    width, height = field(body, "width", int, None), field(body, "height", int, None)
    if (width is None) != (height is None):
        raise InvalidInput("'width' and 'height' go together (or leave both out for the model's frame size)")
    if width is not None and height is not None:
        if not (16 <= width <= MAX_WIDTH and 16 <= height <= MAX_HEIGHT) or width % 2 or height % 2:
            raise InvalidInput(f"the video size must be even, 16..{MAX_WIDTH} x 16..{MAX_HEIGHT}; got "
                               f"{width}x{height}")
    bitrate = field(body, "bitrate_kbps", int, DEFAULT_BITRATE_KBPS)
    if not MIN_BITRATE_KBPS <= bitrate <= MAX_BITRATE_KBPS:
        raise InvalidInput(f"'bitrate_kbps' must be {MIN_BITRATE_KBPS}..{MAX_BITRATE_KBPS}, got {bitrate}")
    paced = not field(body, "unpaced", bool, False)
    return model, sdp, VideoOptions(codec, width, height, bitrate), paced


def parse_offer(sdp: str) -> SessionDescription:
    """The offer, or one line saying why it is not one a session can answer."""
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the malformed line makes it raise
        raise InvalidInput(f"'sdp' is not a valid SDP offer: {type(exc).__name__}: {exc}") from None
    kinds = [media.kind for media in description.media]
    if "video" not in kinds:
        raise InvalidInput("the offer has no video: add a video transceiver (recvonly) to receive the avatar")
    return description


def choose_codec(description: SessionDescription, asked: str | None) -> str:
    """The video codec: the one asked for, or the first H.264 or VP8 in the offer's order of preference."""
    offered = [codec.mimeType.lower() for media in description.media if media.kind == "video"
               for codec in media.rtp.codecs]
    if asked is not None:
        if CODECS[asked].lower() not in offered:
            raise InvalidInput(f"the offer does not accept {asked}: leave 'codec' out, or offer it")
        return asked
    for mime in offered:
        for name, known in CODECS.items():
            if mime == known.lower():
                return name
    raise InvalidInput("the offer accepts neither H.264 nor VP8 video; the pod sends one of those")


def ice_servers(urls: list[str]) -> list[RTCIceServer]:
    servers = []
    for url in urls:
        address, username, password = split_ice_server(url)
        servers.append(RTCIceServer(urls=address, username=username, credential=password))
    return servers


# ------------------------------------------------------------------------------------------ video encoding


class VideoEncoder:
    """One session's encoder: BGR frames in, one compressed packet per frame out (no B-frames, no look-ahead:
    a frame leaves as soon as it is encoded). Called from the encode threads, one frame at a time."""

    def __init__(self, codec: str, options: VideoOptions, fps: int = 25):
        self.codec_name = codec
        self.fps = fps  # the model's, set once the session has started
        self.options = options
        self._context: Any = None
        self._frames = 0

    def _open(self, width: int, height: int) -> Any:
        bitrate = self.options.bitrate_kbps * 1000
        gop = max(1, round(KEYFRAME_INTERVAL_S * self.fps))
        if self.codec_name == "h264":
            context = av.CodecContext.create("libx264", "w")
            context.options = {"preset": X264_PRESET, "tune": "zerolatency",
                               "level": "31" if width * height <= 1280 * 720 else "41",
                               "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
            context.profile = "Baseline"  # what every browser decodes (constrained baseline in the SDP)
        else:
            context = av.CodecContext.create("libvpx", "w")
            context.gop_size = gop
            context.qmin, context.qmax = 2, 56
            context.options = {"deadline": "realtime", "cpu-used": VP8_SPEED, "lag-in-frames": "0",
                               "minrate": str(bitrate), "maxrate": str(bitrate), "bufsize": str(bitrate),
                               "undershoot-pct": "100", "overshoot-pct": "15", "static-thresh": "1"}
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.bit_rate = bitrate
        context.framerate = fractions.Fraction(self.fps, 1)
        context.time_base = fractions.Fraction(1, self.fps)
        context.thread_count = 1  # the pool's threads are the parallelism: one per session's frame
        context.open()
        return context

    def encode(self, bgr: np.ndarray, tick: int) -> av.Packet | None:
        if self.options.width is not None and self.options.height is not None:
            width, height = self.options.width, self.options.height
        else:  # the model's size, made even as yuv420p needs
            width, height = bgr.shape[1] // 2 * 2, bgr.shape[0] // 2 * 2
        if self._context is None:
            self._context = self._open(width, height)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(bgr), format="bgr24")
        frame = frame.reformat(width=width, height=height, format="yuv420p")
        frame.pts = self._frames  # the encoder's own count; the packet carries the tick
        frame.time_base = fractions.Fraction(1, self.fps)
        self._frames += 1
        data = b"".join(bytes(p) for p in self._context.encode(frame))
        if not data:
            return None
        packet = av.Packet(data)
        packet.pts = tick
        packet.time_base = fractions.Fraction(1, self.fps)
        return packet


# ------------------------------------------------------------------------------------------ tracks


class SessionVideoTrack(MediaStreamTrack):
    """The session's frames, encoded when the peer's sender asks for the next one (so a slow peer's frames
    are dropped before they cost an encode). Returns packets: aiortc only packetizes them."""

    kind = "video"

    def __init__(self, encoder: VideoEncoder, pool: ThreadPoolExecutor, paced: bool):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.paced = paced
        self.started = asyncio.Event()  # the sender asked for a frame: the connection is up
        self.dropped = 0
        self._frames: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._changed = asyncio.Event()

    async def put(self, tick: int, bgr: np.ndarray) -> None:
        if self.paced:
            if len(self._frames) >= VIDEO_QUEUE_FRAMES:
                self._frames.popleft()
                self.dropped += 1
        else:  # unpaced: the session waits for this peer (its clock is the reading)
            while len(self._frames) >= VIDEO_QUEUE_FRAMES and self.readyState == "live":
                self._changed.clear()
                await self._changed.wait()
        self._frames.append((tick, bgr))
        self._changed.set()

    async def recv(self) -> av.Packet:  # aiortc's senders take packets too
        self.started.set()
        loop = asyncio.get_running_loop()
        while True:
            while not self._frames:
                if self.readyState != "live":
                    raise MediaStreamError
                self._changed.clear()
                await self._changed.wait()
            tick, bgr = self._frames.popleft()
            self._changed.set()
            packet = await loop.run_in_executor(self.pool, self.encoder.encode, bgr, tick)
            if packet is not None:
                return packet

    def stop(self) -> None:
        super().stop()
        self._changed.set()


class SessionAudioTrack(MediaStreamTrack):
    """The session's returned audio, 20 ms frames of 16 kHz PCM16 stamped with their place on the session's
    timeline (tick k starts at sample k x samples per tick); aiortc's Opus encoder resamples them to 48 kHz."""

    kind = "audio"

    def __init__(self, paced: bool):
        super().__init__()
        self.paced = paced
        self.started = asyncio.Event()
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self._changed = asyncio.Event()

    async def put(self, first_sample: int, pcm16: bytes) -> None:
        for offset in range(0, len(pcm16) // 2, AUDIO_FRAME_SAMPLES):
            piece = pcm16[2 * offset : 2 * (offset + AUDIO_FRAME_SAMPLES)]
            if self.paced:
                if len(self._frames) >= AUDIO_QUEUE_FRAMES:
                    self._frames.popleft()
            else:
                while len(self._frames) >= AUDIO_QUEUE_FRAMES and self.readyState == "live":
                    self._changed.clear()
                    await self._changed.wait()
            self._frames.append((first_sample + offset, piece))
        self._changed.set()

    async def recv(self) -> av.AudioFrame:
        self.started.set()
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._changed.clear()
            await self._changed.wait()
        sample, pcm16 = self._frames.popleft()
        self._changed.set()
        samples = np.frombuffer(pcm16, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        frame.pts = sample
        frame.time_base = fractions.Fraction(1, 16000)
        return frame

    def stop(self) -> None:
        super().stop()
        self._changed.set()


# ------------------------------------------------------------------------------------------ one peer


class WebRtcSession:
    """One peer connection and the session it drives."""

    def __init__(self, door: WebRtcDoor, pc: RTCPeerConnection, config: SessionConfig, codec: str,
                 options: VideoOptions):
        self.door = door
        self.pc = pc
        self.config = config
        self.codec = codec
        self.options = options
        self.id = uuid.uuid4().hex[:16]  # replaced by the session's own id once it starts
        self.inputs: asyncio.Queue[SessionInput] = asyncio.Queue(INPUT_QUEUE_MESSAGES)
        self.video: SessionVideoTrack | None = None
        self.audio: SessionAudioTrack | None = None
        self.channel: Any = None
        self._pending_events: list[str] = []
        self._ended = False
        self.started: asyncio.Future[Started] = asyncio.get_running_loop().create_future()
        self.connected = asyncio.Event()
        self.task: asyncio.Task | None = None
        self._readers: set[asyncio.Task] = set()

    # -------------------------------------------------------------------------------------- inputs

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            with contextlib.suppress(asyncio.QueueFull):
                self.inputs.put_nowait(End())
            if self.inputs.full():  # the End must get in: make room by dropping the newest audio
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.inputs.get_nowait()
                self.inputs.put_nowait(End())

    def _put(self, message: SessionInput) -> None:
        if self._ended:
            return
        try:
            self.inputs.put_nowait(message)
        except asyncio.QueueFull:
            self.send_event({"type": "error", "code": "RESOURCE_EXHAUSTED", "message":
                             f"more than {INPUT_QUEUE_MESSAGES} messages wait for the session: send audio no "
                             "faster than it plays (or in larger chunks)"})

    async def _inputs(self) -> AsyncIterator[SessionInput]:
        while not isinstance(message := await self.inputs.get(), End):
            yield message

    def on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.on("open", self._flush_events)
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._flush_events()

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if len(message) % 2:
                self.send_event({"type": "error", "code": "INVALID_ARGUMENT", "message":
                                 f"binary messages are PCM16 audio: whole 16-bit samples, got {len(message)} bytes"})
                return
            self._put(AudioChunk(message))
            return
        try:
            body = json.loads(message)
            kind = body.get("type") if isinstance(body, dict) else None
        except ValueError:
            kind = None
        if kind == "clear":
            self._put(Clear())
        elif kind == "flush":
            self._put(Flush())
        elif kind == "session_end":
            self.end()
        elif kind == "ping":
            self.send_event({"type": "pong"})
        else:
            self.send_event({"type": "error", "code": "INVALID_ARGUMENT", "message":
                             f"unknown message {echo(str(message)[:80])}: the data channel takes JSON "
                             "{\"type\": \"clear\" | \"flush\" | \"session_end\" | \"ping\"} and binary PCM16"})

    def on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":  # the microphone: the session's input, as 16 kHz mono PCM16
            reader = asyncio.get_running_loop().create_task(self._microphone(track))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)

    async def _microphone(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        with contextlib.suppress(MediaStreamError):
            while not self._ended:
                frame = await track.recv()
                for out in resampler.resample(frame):  # type: ignore[arg-type]
                    pcm = out.to_ndarray().astype("<i2").tobytes()
                    if pcm:
                        self._put(AudioChunk(pcm))

    # -------------------------------------------------------------------------------------- events out

    def send_event(self, body: dict[str, Any]) -> None:
        text = json.dumps(body)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        else:
            self._pending_events.append(text)

    def _flush_events(self) -> None:
        pending, self._pending_events = self._pending_events, []
        for text in pending:
            self.channel.send(text)

    # -------------------------------------------------------------------------------------- running

    async def run(self) -> None:
        """The session, in the request scope like every door's; its frames into the tracks."""
        data_plane = self.door.data_plane
        media_from: int | None = None
        try:
            async with data_plane.request_scope("Session"):
                with data_plane.connection("webrtc"):
                    async for output in data_plane.session(self.config, self._inputs()):
                        if isinstance(output, SessionFrame):
                            media_from = await self._frame(output, media_from)
                            continue
                        if isinstance(output, Started):
                            self.id = output.session_id
                            self.started.set_result(output)
                        self.send_event(session_output_json(output))
                        if isinstance(output, Ended):
                            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.started.done():
                self.started.set_exception(exc)  # refused (429) or failed at the start: the offer's answer
            else:
                reply = reply_for(exc, "WebRTC session")
                self.send_event({"type": "error", "code": reply.code, "message": reply.message})
        finally:
            await self.close()

    async def _frame(self, output: SessionFrame, media_from: int | None) -> int | None:
        """Into the tracks from the first tick both are read (``media_from``): so the two tracks' first RTP
        timestamps are the same tick, and a receiver can line them up without RTCP."""
        assert self.video is not None
        if media_from is None:
            if not self.video.started.is_set() or (self.audio is not None and not self.audio.started.is_set()):
                return None
            media_from = output.tick
            self.connected.set()
            self.send_event({"type": "media_started", "tick": output.tick, "pts": output.pts, "codec": self.codec})
        result = output.result
        bgr = np.frombuffer(result.image, dtype=np.uint8).reshape(result.height, result.width, 3)
        await self.video.put(output.tick, bgr)
        if self.audio is not None:
            await self.audio.put(output.tick * len(output.audio) // 2, output.audio)
        return media_from

    async def close(self) -> None:
        self.end()
        for reader in list(self._readers):
            reader.cancel()
        if self.channel is not None and self.channel.readyState == "open":
            deadline = asyncio.get_running_loop().time() + CLOSE_DRAIN_S
            while self.channel.bufferedAmount and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)  # the transport has no drained event: poll its buffer, bounded
        for track in (self.video, self.audio):
            if track is not None:
                track.stop()
        await self.pc.close()
        self.door.sessions.discard(self)

    async def watch_connection(self) -> None:
        """End the session when the peer never connects, or when its connection fails or closes."""
        try:
            await asyncio.wait_for(self.connected_or_gone(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.info("WebRTC session %s: the peer did not connect within %.0f s", self.id, CONNECT_TIMEOUT_S)
            self.end()

    async def connected_or_gone(self) -> None:
        await self.connected.wait()

    def on_state(self) -> None:
        """A failed or closed connection ends the session now: its tracks stop too, so a frame waiting for
        room in an unpaced track (whose sender no longer reads) does not hold the session open."""
        if self.pc.connectionState in ("failed", "closed"):
            if not self._ended:
                log.info("WebRTC session %s: the peer connection %s", self.id, self.pc.connectionState)
            self.end()
            for track in (self.video, self.audio):
                if track is not None:
                    track.stop()


class WebRtcDoor:
    """The HTTP gateway's WebRTC sessions: built with the gateway, closed when it stops."""

    def __init__(self, data_plane: DataPlane):
        settings = data_plane.settings
        self.data_plane = data_plane
        self.ice_servers = ice_servers(settings.ice_server)
        self.pool = ThreadPoolExecutor(max_workers=settings.webrtc_encode_threads or os.cpu_count() or 1,
                                       thread_name_prefix="webrtc-encode")
        self.sessions: set[WebRtcSession] = set()
        self._watchers: set[asyncio.Task] = set()

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer to an offer, once its session has started (refused past --max-sessions: Overloaded)."""
        model, sdp, options, paced = offer_request(body)
        codec = choose_codec(parse_offer(sdp), options.codec)
        config = SessionConfig(model, OutputSpec(format="raw"), paced=paced)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        session = WebRtcSession(self, pc, config, codec, options)
        try:
            pc.on("datachannel", session.on_channel)
            pc.on("track", session.on_track)
            pc.on("connectionstatechange", session.on_state)
            # Our transceivers before the offer is applied: it takes them (and the codec preference) over.
            session.video = SessionVideoTrack(VideoEncoder(codec, options), self.pool, paced)
            video = pc.addTransceiver(session.video, direction="sendonly")
            video.setCodecPreferences(video_codecs(codec))
            voice = SessionAudioTrack(paced)
            audio = pc.addTransceiver(voice, direction="sendrecv")  # recv: a microphone, if the offer sends one
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except (ValueError, LipSyncError) as exc:
                raise InvalidInput(f"the offer cannot be answered: {exc}") from None
            except Exception as exc:  # aiortc's own errors (no common codec, a missing ICE or DTLS line)
                raise InvalidInput(f"the offer cannot be answered: {type(exc).__name__}: {exc}") from None
            keep_consent(pc, self.data_plane.settings.webrtc_consent_expiry_s)  # before ICE can complete
            if audio.mid is not None:  # the offer has audio: the session's voice goes there
                session.audio = voice
            # The session once the offer is known to be good: a pod at --max-sessions refuses here (429).
            self.sessions.add(session)
            session.task = asyncio.get_running_loop().create_task(session.run(), name="webrtc-session")
            started = await asyncio.shield(session.started)
            session.video.encoder.fps = started.fps
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            session.end()
            if session.task is None:
                await pc.close()
            raise
        watcher = asyncio.get_running_loop().create_task(session.watch_connection())
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        local = pc.localDescription
        return {"sdp": local.sdp, "type": local.type, "session_id": started.session_id, "codec": codec}

    async def close(self) -> None:
        """The pod stops: every session ends and its connection closes."""
        for session in list(self.sessions):
            session.end()
        tasks = [s.task for s in list(self.sessions) if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for watcher in list(self._watchers):
            watcher.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def video_codecs(name: str) -> list:
    """The sender's capabilities for ``name`` (every profile of it) and retransmission."""
    mime = CODECS[name].lower()
    codecs = RTCRtpSender.getCapabilities("video").codecs
    return [c for c in codecs if c.mimeType.lower() == mime] + [c for c in codecs if c.mimeType.lower() == "video/rtx"]
