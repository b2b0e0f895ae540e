"""A voice bot with a lip-synced face: Pipecat's speech-to-text, LLM and text-to-speech, then a pod's live
session as the avatar (inference_pod.integrations.pipecat), shown through Pipecat's small WebRTC transport.

    pip install ".[pipecat]" "pipecat-ai[webrtc,runner,silero,deepgram,openai,cartesia]"
    lipsync serve --models-dir models --preload demo &           # the pod (gRPC on 50051)
    DEEPGRAM_API_KEY=... OPENAI_API_KEY=... CARTESIA_API_KEY=... \\
        LIPSYNC_POD=localhost:50051 LIPSYNC_MODEL=demo python examples/pipecat_avatar_bot.py

then open http://localhost:7860/client, allow the microphone and talk. Interrupting the bot (speaking over it)
clears the session: the face stops mid-word with the voice.
"""

from __future__ import annotations

import os

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.runner.types import RunnerArguments
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from inference_pod.integrations.pipecat import LipSyncVideoService

WIDTH, HEIGHT = 1280, 720  # the character's frame size (the demo's is smaller: Pipecat scales nothing)


async def bot(runner_args: RunnerArguments) -> None:
    transport = SmallWebRTCTransport(
        webrtc_connection=runner_args.webrtc_connection,  # type: ignore[attr-defined]
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True, video_out_enabled=True,
                               video_out_is_live=True, video_out_width=WIDTH, video_out_height=HEIGHT,
                               video_out_framerate=25))
    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    llm = OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"])
    tts = CartesiaTTSService(api_key=os.environ["CARTESIA_API_KEY"],
                             voice_id=os.environ.get("CARTESIA_VOICE_ID", "71a7ad14-091c-4e8e-a314-022ece01c121"))
    avatar = LipSyncVideoService(target=os.environ.get("LIPSYNC_POD", "localhost:50051"),
                                 model=os.environ.get("LIPSYNC_MODEL", "demo"),
                                 api_key=os.environ.get("LIPSYNC_API_KEY"))
    context = LLMContext([{"role": "system", "content": "You are a friendly avatar. Answer in one or two short "
                                                        "spoken sentences."}])
    aggregators = LLMContextAggregatorPair(context,
                                           user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))
    pipeline = Pipeline([
        transport.input(), stt, aggregators.user(), llm, tts,
        avatar,  # TTS audio in; the face and its voice, in step, out
        transport.output(), aggregators.assistant(),
    ])
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))
    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
