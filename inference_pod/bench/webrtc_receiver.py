"""A WebRTC viewer of a pod's live session, with aiortc: what a browser does, in Python.

``WebRtcReceiver`` offers to receive video and audio (and opens the control data channel), posts the offer
to ``POST /webrtc/offer``, and then keeps every decoded video frame and every decoded audio frame with its
RTP timestamp, and every event from the data channel. Audio pushed with ``send_pcm`` goes over the data
channel. Used by the WebRTC tests and benchmarks: everything is measured from what arrived, as a viewer
would see and hear it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from inference_pod.api.http.webrtc_consent import keep_consent

VIDEO_CLOCK = 90000  # RTP clock of every video codec
AUDIO_CLOCK = 48000  # Opus
PCM_MESSAGE_BYTES = 16000  # pushed audio is cut into data channel messages of at most this (0.5 s)


class OfferRefused(Exception):
    """The pod answered the offer with an error: ``status`` (429 when full) and its JSON body."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(f"{status}: {body.get('error', body)}")
        self.status = status
        self.body = body


@dataclass
class Received:
    """What arrived, in order: decoded video frames and audio, with their RTP timestamps (counted from each
    track's first packet, as aiortc gives them), and the data channel's events."""

    video: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (pts at 90 kHz, BGR image)
    audio: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (pts at 48 kHz, mono int16 samples)
    events: list[dict[str, Any]] = field(default_factory=list)

    def audio_16k(self) -> np.ndarray:
        """The audio on its timeline (gaps as silence) as 16 kHz float in -1..1, from its first timestamp."""
        if not self.audio:
            return np.zeros(0, dtype=np.float32)
        end = max(pts + len(samples) for pts, samples in self.audio)
        timeline = np.zeros(end, dtype=np.float32)
        for pts, samples in self.audio:
            timeline[pts : pts + len(samples)] = samples / 32768.0
        return timeline[::3].copy()  # 48 kHz -> 16 kHz; Opus carries nothing above 8 kHz here (speech)

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]


class WebRtcReceiver:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, **options: Any):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.options = options  # codec, width, height, bitrate_kbps, unpaced
        self.pc = RTCPeerConnection()
        self.received = Received()
        self.answer: dict[str, Any] = {}
        self._changed = asyncio.Event()
        self._readers: list[asyncio.Task] = []
        self.channel = self.pc.createDataChannel("control")
        self.channel.on("message", self._on_event)
        self._open = asyncio.Event()
        self.channel.on("open", self._open.set)
        self.pc.on("track", self._on_track)

    async def connect(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Offer, post, apply the answer; then wait for the data channel to open. Returns the answer."""
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        keep_consent(self.pc)  # a receiver starved of CPU answers late, not never: so may the pod
        body = {"model_name": self.model, "sdp": self.pc.localDescription.sdp, "type": "offer", **self.options}
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        async with aiohttp.ClientSession() as http, \
                http.post(f"{self.base_url}/webrtc/offer", json=body, headers=headers) as response:
            answer = await response.json()
            if response.status != 200:
                raise OfferRefused(response.status, answer)
        self.answer = answer
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.wait_for(self._open.wait(), timeout_s)
        return answer

    def _on_event(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.received.events.append(json.loads(message))
            self._changed.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._readers.append(asyncio.get_running_loop().create_task(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    self.received.video.append((int(frame.pts or 0), frame.to_ndarray(format="bgr24")))
                elif isinstance(frame, av.AudioFrame):
                    samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))  # s16 interleaved
                    self.received.audio.append((int(frame.pts or 0), samples.mean(axis=1).astype(np.int16)))
                self._changed.set()

    async def until(self, condition, timeout_s: float = 120.0, what: str = "the condition") -> None:
        """Wait (with a deadline) until ``condition(received)`` holds, checking whenever something arrives."""
        async def wait() -> None:
            while not condition(self.received):
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"WebRTC receiver: no {what} within {timeout_s:.0f} s") from None

    async def event(self, kind: str, after: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
        """The first event of ``kind`` after the first ``after`` of them."""
        await self.until(lambda r: len(r.events_of(kind)) > after, timeout_s, f"{kind} event")
        return self.received.events_of(kind)[after]

    def send(self, kind: str) -> None:
        self.channel.send(json.dumps({"type": kind}))

    def send_pcm(self, pcm16: bytes) -> None:
        for start in range(0, len(pcm16), PCM_MESSAGE_BYTES):
            self.channel.send(pcm16[start : start + PCM_MESSAGE_BYTES])

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self.pc.close()
