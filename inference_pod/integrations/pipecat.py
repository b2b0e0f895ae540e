"""A Pipecat avatar service: a pod's live session (over gRPC) as a frame processor of a voice bot.

Put it after the TTS service and before the output transport::

    pipeline = Pipeline([transport.input(), stt, context.user(), llm, tts,
                         LipSyncVideoService(target="pod:50051", model="alice"),
                         transport.output(), context.assistant()])

It takes the TTS audio (``TTSAudioRawFrame``, any rate: resampled to the session's 16 kHz), feeds the session
and, for every tick of the session's clock, pushes the tick's image (``OutputImageRawFrame``, RGB, queued with
the audio so the transport shows it when the audio before it has played) and its audio
(``OutputAudioRawFrame``, 16 kHz mono: the voice where it was placed, silence while idle). The TTS audio does
not go on: the bot's voice is the audio the session returns, in step with the face.

``TTSStoppedFrame`` flushes the utterance; an ``InterruptionFrame`` (the user barged in) clears the session, so
the face is idle from the next tick. ``BotStartedSpeakingFrame`` / ``BotStoppedSpeakingFrame`` follow the
session: started at the first tick that plays the utterance's voice, stopped when the session says its
playback finished or was cleared (both pushed upstream and downstream, as Pipecat's output transports do).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from inference_pod.client import AsyncLipSyncClient, AsyncLiveSession, decode_frame

SAMPLE_RATE = 16000  # a session's audio, in and out


class LipSyncVideoService(FrameProcessor):
    """The avatar of one bot: one session on the pod at ``target`` for as long as the pipeline runs."""

    def __init__(self, *, target: str, model: str, api_key: str | None = None, tls: bool = False,
                 format: str = "jpeg", jpeg_quality: int = 0, unpaced: bool = False, **kwargs: Any):
        """``format``: how frames travel from the pod (jpeg, or raw where bot and pod share a host);
        ``unpaced``: the session ticks as fast as frames are taken (offline rendering, tests) instead of in
        real time."""
        super().__init__(**kwargs)
        self._target = target
        self._model = model
        self._api_key = api_key
        self._tls = tls
        self._format, self._jpeg_quality, self._unpaced = format, jpeg_quality, unpaced
        self._client: AsyncLipSyncClient | None = None
        self._session: AsyncLiveSession | None = None
        self._reader: asyncio.Task | None = None
        self._resampler = create_stream_resampler()
        self._speaking = False
        self._utterance_pending = False  # voice sent that has not started playing yet
        self.fps: int | None = None  # the model's, once the session has started

    # -------------------------------------------------------------------------------------- frames in

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, TTSAudioRawFrame):
            await self._speak(frame)  # consumed: the session's audio goes on instead, in step with the face
        elif isinstance(frame, TTSStoppedFrame):
            if self._session is not None:
                await self._session.flush()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            if self._session is not None:
                await self._session.clear()
            self._utterance_pending = False
            await self.push_frame(frame, direction)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop(cancel=isinstance(frame, CancelFrame))
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _start(self) -> None:
        self._client = AsyncLipSyncClient(self._target, api_key=self._api_key, tls=self._tls, timeout=None)
        self._session = self._client.session(self._model, unpaced=self._unpaced, format=self._format,
                                             jpeg_quality=self._jpeg_quality)
        self._reader = self.create_task(self._read(self._session))

    async def _speak(self, frame: TTSAudioRawFrame) -> None:
        if self._session is None:
            return
        pcm = frame.audio
        if frame.num_channels > 1:  # the voice: the channels' mean
            samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, frame.num_channels)
            pcm = samples.mean(axis=1).astype("<i2").tobytes()
        pcm = await self._resampler.resample(pcm, frame.sample_rate, SAMPLE_RATE)
        if pcm:
            self._utterance_pending = True
            await self._session.send_audio(pcm)

    async def _stop(self, cancel: bool) -> None:
        session, self._session = self._session, None
        if session is not None:
            if cancel:
                session.cancel()
            else:
                await session.end()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)  # its SessionEnded, bounded
            await self.cancel_task(self._reader)
            self._reader = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -------------------------------------------------------------------------------------- frames out

    async def _read(self, session: AsyncLiveSession) -> None:
        try:
            async for response in session:
                kind = response.WhichOneof("message")
                if kind == "frame":
                    await self._frame(response.frame)
                elif kind == "started":
                    self.fps = response.started.fps
                elif kind in ("playback_finished", "cleared"):
                    await self._speaking_changed(False)
                elif kind == "ended":
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the pod refused (full: RESOURCE_EXHAUSTED) or went away
            details = exc.details() if hasattr(exc, "details") else str(exc)
            await self.push_error(error_msg=f"lip-sync session on {self._target}: {details}", exception=exc)

    async def _frame(self, tick: Any) -> None:
        if self._utterance_pending and tick.audio.strip(b"\0"):
            self._utterance_pending = False
            await self._speaking_changed(True)
        bgr = decode_frame(tick.frame)
        image = OutputImageRawFrame(image=np.ascontiguousarray(bgr[:, :, ::-1]).tobytes(),
                                    size=(bgr.shape[1], bgr.shape[0]), format="RGB")
        image.sync_with_audio = True  # shown once the audio before it has played: face and voice in step
        image.pts = round(tick.pts * 1e9)  # Pipecat's pts are nanoseconds
        await self.push_frame(image)
        audio = OutputAudioRawFrame(audio=tick.audio, sample_rate=SAMPLE_RATE, num_channels=1)
        audio.pts = image.pts
        await self.push_frame(audio)

    async def _speaking_changed(self, speaking: bool) -> None:
        if speaking == self._speaking:
            return
        self._speaking = speaking
        kind = BotStartedSpeakingFrame if speaking else BotStoppedSpeakingFrame
        await self.push_frame(kind())
        await self.push_frame(kind(), FrameDirection.UPSTREAM)


__all__ = ["LipSyncVideoService"]
