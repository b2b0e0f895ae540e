"""The Pipecat avatar service (inference_pod.integrations.pipecat) in a real Pipecat pipeline against a real pod
on loopback: TTS audio frames in (a recorded voice at 24 kHz, standing in for a TTS service), the service,
and a sink that records what an output transport would get.

The face in the images follows the voice in the audio frames pushed with them (measured from the pixels,
as the quality gate measures), the bot's speaking frames follow the session, and an interruption frame stops
the speech: silence and a closed mouth from then on. The session runs unpaced, so a busy CPU repeats no frame.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from conditions import wait_until_async
from serving_support import LOOPBACK, free_port, needs_espeak, started_pod, trained_demo_models

from inference_pod.serving.settings import Settings
from inference_pod.tools.demo_character import mouth_track, speech_track
from inference_pod.tools.lipsync_quality import (
    HELD_OUT_SPEECH,
    MIN_CORRELATION,
    mouth_opening_pixels,
    sync_score,
)

pipecat = pytest.importorskip("pipecat", reason="the [pipecat] extra is not installed")

from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from inference_pod.integrations.pipecat import LipSyncVideoService  # noqa: E402

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("one_torch_thread")]
TTS_RATE = 24000  # a typical TTS service's rate: the service resamples it to the session's 16 kHz
TICK = 640


class Recorder(FrameProcessor):
    """The end of the pipeline: what an output transport would get, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, (OutputImageRawFrame, OutputAudioRawFrame, BotStartedSpeakingFrame,
                              BotStoppedSpeakingFrame, InterruptionFrame, TTSAudioRawFrame)):
            self.frames.append(frame)
            self.changed.set()
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list[Frame]:
        return [f for f in self.frames if isinstance(f, kind)]

    def count(self, kind: type) -> int:
        return len(self.of(kind))


def tts_frames(wav16k: np.ndarray) -> list[Frame]:
    """An utterance as a TTS service sends it: started, 20 ms chunks of 24 kHz PCM16, stopped."""
    import soxr

    wav = soxr.resample(wav16k.astype(np.float32), 16000, TTS_RATE)
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
    chunk = TTS_RATE // 50 * 2
    return [TTSStartedFrame(), *(TTSAudioRawFrame(audio=pcm[i : i + chunk], sample_rate=TTS_RATE, num_channels=1)
                                 for i in range(0, len(pcm), chunk)), TTSStoppedFrame()]


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory) -> Path:
    return trained_demo_models(tmp_path_factory.mktemp("pipecat-models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trained_pod(trained_models):
    settings = Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=trained_models,
                        max_batch=8, max_batch_delay_ms=5, encode_threads=2, shutdown_grace_s=5, preload=["demo"])
    async with started_pod(settings) as server:
        yield server


async def until(recorder: Recorder, condition, what: str, timeout_s: float = 180.0) -> None:
    async def wait() -> None:
        while not condition():
            recorder.changed.clear()
            await recorder.changed.wait()

    try:
        await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {what} within {timeout_s:.0f} s") from None


@needs_espeak
async def test_a_pipecat_pipeline_gets_the_face_in_sync_with_the_voice_and_an_interruption_stops_it(trained_pod):
    server = trained_pod
    first, second = speech_track(HELD_OUT_SPEECH[:1]), speech_track(HELD_OUT_SPEECH[1:])
    recorder = Recorder()
    service = LipSyncVideoService(target=f"{LOOPBACK}:{server.port}", model="demo", format="raw", unpaced=True)
    task = PipelineWorker(Pipeline([service, recorder]), params=PipelineParams(), enable_rtvi=False)
    workers = WorkerRunner(handle_sigint=False)
    await workers.add_workers(task)
    runner = asyncio.get_running_loop().create_task(workers.run())
    try:
        await until(recorder, lambda: recorder.count(OutputImageRawFrame) >= 30, "30 idle frames")
        await task.queue_frames(tts_frames(first))
        await until(recorder, lambda: recorder.count(BotStoppedSpeakingFrame) >= 1, "the end of the first utterance")
        stopped_at = recorder.count(OutputImageRawFrame)
        await until(recorder, lambda: recorder.count(OutputImageRawFrame) >= stopped_at + 20, "20 idle frames")
        await task.queue_frames(tts_frames(second))
        await until(recorder, lambda: recorder.count(BotStartedSpeakingFrame) >= 2, "the second utterance")
        speaking_at = recorder.count(OutputImageRawFrame)
        await until(recorder, lambda: recorder.count(OutputImageRawFrame) >= speaking_at + 20, "20 speaking frames")
        await task.queue_frame(InterruptionFrame())
        await until(recorder, lambda: recorder.count(BotStoppedSpeakingFrame) >= 2, "the bot stopped by the interruption")
        interrupted_at = recorder.count(OutputImageRawFrame)
        await until(recorder, lambda: recorder.count(OutputImageRawFrame) >= interrupted_at + 25, "25 frames after it")
        await task.queue_frame(EndFrame())
        await asyncio.wait_for(runner, 60)
    finally:
        if not runner.done():
            await task.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    await wait_until_async(lambda: not server.data_plane.sessions_active, what="the session to end", timeout=30)

    # The TTS audio does not go on; each image is followed by its tick's audio, 40 ms of 16 kHz.
    assert not recorder.of(TTSAudioRawFrame)
    media = [f for f in recorder.frames if isinstance(f, (OutputImageRawFrame, OutputAudioRawFrame))]
    images, audio = media[0::2], media[1::2]
    assert all(isinstance(f, OutputImageRawFrame) for f in images)
    assert all(isinstance(f, OutputAudioRawFrame) and f.sample_rate == 16000 and len(f.audio) == 2 * TICK
               for f in audio)
    assert [a.pts for a in audio] == [i.pts for i in images]

    # The face follows the voice pushed with it: the quality gate's measure, peak at offset 0 +- 1.
    engine = server.data_plane.store.resident[0].engine
    bgr = [np.frombuffer(f.image, np.uint8).reshape(f.size[1], f.size[0], 3)[:, :, ::-1] for f in images]
    measured = np.array([mouth_opening_pixels(image, engine.crop_box(engine.template_index(tick)))
                         for tick, image in enumerate(bgr)])
    voice = np.frombuffer(b"".join(a.audio for a in audio), "<i2").astype(np.float32) / 32768.0
    truth = mouth_track(voice, len(images))[:, 0]
    span = slice(max(0, int(np.flatnonzero(truth > 0.05)[0]) - 10), stopped_at + 5)
    r0, peak, correlations = sync_score(measured[span], truth[span])
    print(f"pipecat: r={r0:.3f} at offset 0, peak {peak:+d} over {span.stop - span.start} frames")
    assert r0 >= MIN_CORRELATION and abs(peak) <= 1, (r0, peak, correlations)

    # The bot's speaking frames bracket the voice: started at its first voiced tick, stopped after its last.
    order = [f for f in recorder.frames if isinstance(f, (OutputImageRawFrame, BotStartedSpeakingFrame,
                                                          BotStoppedSpeakingFrame))]
    started_tick = sum(isinstance(f, OutputImageRawFrame) for f in order[: order.index(recorder.of(BotStartedSpeakingFrame)[0])])
    voiced_ticks = [i for i, a in enumerate(audio) if a.audio.strip(b"\0")]
    assert started_tick == voiced_ticks[0]

    # The interruption: from two ticks on, silence and a closed mouth; the rest of the voice never plays.
    closed_level = np.median(measured[span][truth[span] < 0.02])
    open_level = np.median(measured[span][truth[span] > 0.5])
    scale = (measured - closed_level) / (open_level - closed_level)
    assert scale[speaking_at - 20 : interrupted_at].max() > 0.5  # it was speaking
    after = slice(interrupted_at + 2, len(images))
    assert not any(a.audio.strip(b"\0") for a in audio[after.start :])
    assert scale[after].max() < 0.5, scale[after].round(2)
    played = sum(len(a.audio.strip(b"\0")) for a in audio[stopped_at:]) // 2
    assert played < 0.8 * len(second)
