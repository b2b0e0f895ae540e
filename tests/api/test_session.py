"""Live avatar sessions against real pods on loopback: the trained demo idling, speaking in sync with its
voice and stopped by a barge-in (measured from its pixels as the quality gate measures them), the returned
audio sample for sample, admission past --max-sessions, bad input with the same words on gRPC and the
WebSocket, and the WebSocket session against the gRPC one.

Sessions here run unpaced (their clock is the reader's reading, a couple of frames ahead of it): the
timeline and every frame are what a real-time session gives, without asserting anything about speed on a
shared CPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import jsonschema
import numpy as np
import pytest
import pytest_asyncio
from conditions import wait_until_async
from serving_support import (
    LOOPBACK,
    free_port,
    models_dir_with,
    needs_espeak,
    pcm16,
    speech_pcm16,
    started_pod,
    trained_demo_models,
)

from inference_pod.app import Pod
from inference_pod.client import AsyncLipSyncClient
from inference_pod.core.encoding import decode_image
from inference_pod.core.engine import CropBox
from inference_pod.serving.settings import Settings
from inference_pod.tools.demo_character import mouth_track, speech_track
from inference_pod.tools.lipsync_quality import (
    HELD_OUT_SPEECH,
    MIN_CORRELATION,
    mouth_opening_pixels,
    sync_score,
)
from lipsync.v1 import lipsync_pb2 as pb

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("one_torch_thread")]
TICK = 640  # samples per 25 fps tick


def settings_for(models_dir: Path, **overrides) -> Settings:
    values = {"host": LOOPBACK, "port": 0, "metrics_port": 0, "http_port": free_port(), "models_dir": models_dir,
              "max_batch": 8, "max_batch_delay_ms": 5, "encode_threads": 2, "shutdown_grace_s": 5}
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(settings: Settings):
    async with started_pod(settings) as server:
        client = AsyncLipSyncClient(f"{LOOPBACK}:{server.port}", timeout=None)
        try:
            yield server, client
        finally:
            await client.close()


@dataclass
class Recording:
    """Everything a session sent back, in order."""

    frames: list[pb.SessionFrame] = field(default_factory=list)
    events: list[pb.SessionResponse] = field(default_factory=list)

    def add(self, response: pb.SessionResponse) -> None:
        if response.WhichOneof("message") == "frame":
            self.frames.append(response.frame)
        else:
            self.events.append(response)

    def event(self, kind: str):
        return [getattr(e, kind) for e in self.events if e.WhichOneof("message") == kind]

    @property
    def audio(self) -> np.ndarray:
        return np.frombuffer(b"".join(f.audio for f in self.frames), "<i2")

    def kinds(self) -> list[str]:
        return [pb.FrameKind.Name(f.kind).removeprefix("FRAME_KIND_").lower() for f in self.frames]


class Driver:
    """Reads a session's responses until a condition holds, recording them."""

    def __init__(self, session):
        self.session = session
        self.responses = session.__aiter__()
        self.recording = Recording()

    async def until(self, condition, deadline_s: float = 300.0) -> pb.SessionResponse:
        async def read():
            while True:
                response = await anext(self.responses)
                self.recording.add(response)
                if condition(response):
                    return response

        return await asyncio.wait_for(read(), deadline_s)

    def frame_at_least(self, tick: int):
        return lambda r: r.WhichOneof("message") == "frame" and r.frame.tick >= tick

    async def send(self, pcm: bytes) -> None:
        """An utterance in one message, as a TTS reply would come: one piece on the timeline (chunks that
        arrive after their time would leave gaps, as a live voice's would)."""
        await self.session.send_audio(pcm)

    async def end(self) -> Recording:
        await self.session.end()
        await self.until(lambda r: r.WhichOneof("message") == "ended")
        assert await anext(self.responses, None) is None  # the call ends after SessionEnded
        return self.recording


def is_(kind: str):
    return lambda r: r.WhichOneof("message") == kind


def opening(frame: pb.Frame) -> float:
    """The mouth's opening measured from the frame's pixels (the quality gate's measure)."""
    box = frame.crop_box
    image = decode_image(frame.image, "raw", frame.width, frame.height)
    return mouth_opening_pixels(image, CropBox(box.x1, box.y1, box.x2, box.y2, box.size))


async def no_session_running(server) -> None:
    """Until the previous test's sessions have wound down (a slot frees when its call has ended)."""
    await wait_until_async(lambda: not server.data_plane.sessions_active, what="the previous sessions to end",
                           timeout=30)
    assert not server.data_plane.sessions_active


def placed_at(timeline: np.ndarray, speech: np.ndarray) -> int:
    """Where ``speech`` starts in the session's returned audio (its first non-zero sample, found there)."""
    voiced = int(np.flatnonzero(speech)[0])
    return int(np.flatnonzero(timeline)[0]) - voiced


# ------------------------------------------------------------------------------------------ the trained demo


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory) -> Path:
    return trained_demo_models(tmp_path_factory.mktemp("session-models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trained_pod(trained_models):
    async with running(settings_for(trained_models, preload=["demo"])) as pod:
        yield pod


@needs_espeak
async def test_a_session_idles_speaks_in_sync_and_stops_at_a_clear(trained_pod):
    """2 s idle, an utterance, 2 s idle, an utterance cut by a clear: a frame every tick with continuous
    timestamps; idle mouths closed and speaking ones following the voice, measured from the pixels as the
    quality gate measures them; the returned audio is the input at its timestamps; after the clear the
    avatar is idle at once (the next-but-one frame the client sees, the very next tick on the server)."""
    server, client = trained_pod
    first = np.frombuffer(pcm16(speech_track(HELD_OUT_SPEECH[:1])), "<i2")
    second = np.frombuffer(pcm16(speech_track(HELD_OUT_SPEECH[1:])), "<i2")
    metrics = server.data_plane.metrics
    barge_ins_before = metrics.sample("lipsync_session_barge_ins_total", {"model": "demo"})

    drive = Driver(client.session("demo", unpaced=True, format="raw"))
    started = (await drive.until(is_("started"))).started
    assert (started.fps, started.sample_rate, started.samples_per_tick) == (25, 16000, TICK)
    assert 0.45 < started.lookahead_s < 1.0
    await drive.until(drive.frame_at_least(49))  # 2 s of idle
    await drive.send(first.tobytes())
    await drive.session.flush()
    finished = (await drive.until(is_("playback_finished"))).playback_finished
    await drive.until(drive.frame_at_least(finished.tick + 50))  # 2 s of idle
    await drive.send(second.tobytes())
    await drive.until(lambda r: r.WhichOneof("message") == "frame"
                      and sum(bool(f.audio.strip(b"\0")) for f in drive.recording.frames[finished.tick + 1 :]) >= 25)
    seen_before_clear = drive.recording.frames[-1].tick
    await drive.session.clear()
    cleared = (await drive.until(is_("cleared"))).cleared
    await drive.until(drive.frame_at_least(max(cleared.tick, seen_before_clear) + 25))
    recording = await drive.end()
    frames, kinds = recording.frames, recording.kinds()

    # A frame every tick, timestamps continuous, none late (unpaced: none can be).
    assert [f.tick for f in frames] == list(range(len(frames)))
    assert all(f.pts == pytest.approx(f.tick / 25) and f.frame.frame_id == f.tick for f in frames)
    assert "repeated" not in kinds and all(len(f.audio) == 2 * TICK for f in frames)

    # The returned audio is the input, sample for sample, where it was placed; silence everywhere else.
    timeline = recording.audio
    at1 = placed_at(timeline, first)
    np.testing.assert_array_equal(timeline[at1 : at1 + len(first)], first)
    assert finished.utterance == 1 and finished.samples == len(first)
    assert finished.tick == (at1 + len(first) - 1) // TICK  # reported when its last sample played
    rest = timeline[at1 + len(first) :]
    at2 = at1 + len(first) + placed_at(rest, second)
    assert cleared.played_samples + cleared.dropped_samples == len(second)
    assert at2 + cleared.played_samples == (cleared.tick + 1) * TICK  # played up to the clear's tick
    np.testing.assert_array_equal(timeline[at2 : at2 + cleared.played_samples], second[: cleared.played_samples])
    assert not timeline[:at1].any() and not timeline[at1 + len(first) : at2].any()
    assert not timeline[at2 + cleared.played_samples :].any()
    assert len(recording.event("playback_finished")) == 1  # the cut utterance never finishes

    # After the clear: idle at once, and from then on.
    assert kinds[seen_before_clear + 2] == "idle"
    assert set(kinds[cleared.tick + 1 :]) == {"idle"}

    # The pixels: the mouth follows the voice over the first utterance and is closed while idle.
    measured = np.array([opening(f.frame) for f in frames])
    truth = mouth_track(timeline.astype(np.float32) / 32768.0, len(frames))[:, 0]
    span = slice(at1 // TICK - 10, (at1 + len(first)) // TICK + 10)
    r0, peak, correlations = sync_score(measured[span], truth[span])
    assert r0 >= MIN_CORRELATION and abs(peak) <= 1, (r0, peak, correlations)
    # Closed: an idle mouth measures as the mouth does in the utterance's pauses, far from it open (the
    # measure counts the lips' darkness too, so closed is not 0: it is placed on the closed..open scale).
    idle = np.array([k == "idle" for k in kinds])
    closed_level = np.median(measured[span][truth[span] < 0.02])
    open_level = np.median(measured[span][truth[span] > 0.5])
    scale = (measured[idle] - closed_level) / (open_level - closed_level)
    assert scale.mean() < 0.2 and scale.max() < 0.5, (closed_level, open_level, scale.mean(), scale.max())
    print(f"session: r={r0:.3f} at offset 0 (peak {peak:+d}) over {span.stop - span.start} ticks; idle mouths at "
          f"{scale.mean():.2f} (max {scale.max():.2f}) of closed..open")

    # The idle cache: each template's idle frame computed at most once; the rest cost no network call.
    ended = recording.event("ended")[0]
    assert ended.ticks == len(frames) and ended.repeated_frames == ended.dropped_frames == 0
    assert ended.speaking_frames == kinds.count("speaking")
    assert ended.idle_cached_frames + ended.idle_computed_frames == kinds.count("idle")
    assert ended.idle_computed_frames <= 50 and ended.idle_cached_frames > 0
    print(f"session: {len(frames)} ticks: {ended.speaking_frames} speaking, {ended.idle_cached_frames} idle from the "
          f"cache, {ended.idle_computed_frames} idle computed")
    assert metrics.sample("lipsync_session_barge_ins_total", {"model": "demo"}) == barge_ins_before + 1
    assert metrics.sample("lipsync_session_frames_total", {"model": "demo", "kind": "speaking"}) >= \
        ended.speaking_frames


# ------------------------------------------------------------------------------------------ a small pod


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def small_pod(tmp_path_factory):
    models = models_dir_with(tmp_path_factory.mktemp("small-session-pod") / "models", "demo-1")
    async with running(settings_for(models, preload=["demo"], max_sessions=1)) as pod:
        yield pod


def ws_url(server) -> str:
    return f"ws://{LOOPBACK}:{server.data_plane.settings.http_port}/ws"


WS_SCHEMAS = {"session_started": "WsSessionStarted", "session_frame": "WsSessionFrame", "cleared": "WsCleared",
              "playback_finished": "WsPlaybackFinished", "session_ended": "WsSessionEnded", "error": "WsError"}


async def conform_to_the_pods_openapi(server, messages: list[dict]) -> None:
    """Every message is valid against the pod's own OpenAPI document (its /ws schemas)."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://{LOOPBACK}:{server.data_plane.settings.http_port}/openapi.json") as response:
        spec = await response.json()
    for message in messages:
        schema = {"$ref": f"#/components/schemas/{WS_SCHEMAS[message['type']]}", "components": spec["components"]}
        jsonschema.Draft202012Validator(schema).validate(message)


async def ws_session(server, start: dict, script) -> list[dict]:
    """A WebSocket session: ``script(ws, messages)`` sends; every message received is returned."""
    received: list[dict] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(server)) as ws:
        await ws.send_str(json.dumps({"type": "session_start", "model_name": "demo", "unpaced": True, **start}))
        await script(ws, received)
    return received


async def ws_until(ws, received: list[dict], condition, deadline_s: float = 120.0) -> dict:
    async def read():
        while True:
            message = await ws.receive(timeout=deadline_s)
            if message.type != aiohttp.WSMsgType.TEXT:
                return {"closed": ws.close_code}
            body = json.loads(message.data)
            received.append(body)
            if condition(body):
                return body

    return await asyncio.wait_for(read(), deadline_s)


async def test_past_max_sessions_a_session_is_refused_at_once_and_the_running_one_keeps_its_pace(small_pod):
    server, client = small_pod
    await no_session_running(server)
    refused_before = server.data_plane.metrics.sample("lipsync_sessions_refused_total")
    running_one = Driver(client.session("demo", unpaced=True))
    await running_one.until(running_one.frame_at_least(5))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in client.session("demo"):
            pass
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum of 1 live sessions (--max-sessions)" in refused.value.details()

    async def refused_on_the_websocket(ws, received):
        await ws_until(ws, received, lambda body: body.get("type") == "error")
        assert (await ws.receive(timeout=30)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER

    [error] = await ws_session(server, {}, refused_on_the_websocket)
    assert (error["code"], error["http_status"]) == ("RESOURCE_EXHAUSTED", 429)
    assert error["message"] == refused.value.details()  # the same words on both doors
    await conform_to_the_pods_openapi(server, [error])

    await running_one.until(running_one.frame_at_least(40))
    recording = await running_one.end()
    assert [f.tick for f in recording.frames] == list(range(len(recording.frames)))
    assert "repeated" not in recording.kinds() and recording.event("ended")[0].dropped_frames == 0
    assert server.data_plane.metrics.sample("lipsync_sessions_refused_total") == refused_before + 2

    await no_session_running(server)
    again = Driver(client.session("demo", unpaced=True))
    await again.until(is_("started"))
    await again.end()


BAD_INPUT = {  # name: (gRPC requests after nothing, WebSocket session_start fields, then binary / text sent)
    "audio before the config": ([pb.SessionRequest(flush=pb.SessionFlush())], None, {"type": "flush"}),
    "a sample rate other than 16 kHz": ([pb.SessionRequest(config=pb.SessionConfig(model="demo", sample_rate=48000))],
                                        {"sample_rate": 48000}, None),
    "an odd number of bytes": ([pb.SessionRequest(config=pb.SessionConfig(model="demo", unpaced=True)),
                                pb.SessionRequest(pcm16=b"\x01\x02\x03")], {}, b"\x01\x02\x03"),
    "an unknown model": ([pb.SessionRequest(config=pb.SessionConfig(model="nobody"))], {"model_name": "nobody"},
                         None),
    "binary audio before session_start": ([pb.SessionRequest(pcm16=b"\x00\x00")], None, b"\x00\x00"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
async def test_bad_input_is_one_clear_error_with_the_same_words_on_both_doors(small_pod, case):
    server, client = small_pod
    await no_session_running(server)
    requests, start, then = BAD_INPUT[case]

    async def messages():
        for request in requests:
            yield request
        await asyncio.Event().wait()  # the stream stays open: the error must come from the server, which ends it

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in client.stub.Session(messages()):
            pass
    code, words = failed.value.code(), failed.value.details()
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), words

    async def script(ws, received):
        if start is not None:
            await ws.send_str(json.dumps({"type": "session_start", "model_name": "demo", "unpaced": True, **start}))
        if isinstance(then, bytes):
            if start is not None:
                await ws_until(ws, received, lambda body: body["type"] == "session_started")
            await ws.send_bytes(then)
        elif then is not None:
            await ws.send_str(json.dumps(then))
        await ws_until(ws, received, lambda body: body["type"] == "error")

    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(server)) as ws:
        received: list[dict] = []
        await script(ws, received)
        assert not ws.closed  # a bad session is its error, not the socket's end
    error = received[-1]
    assert error["code"] == code.name
    # The same words; the WebSocket's binary audio may also follow audio_start, which it names after them.
    assert error["message"] == words or error["message"].startswith(f"{words} (or after audio_start"), error


async def test_the_websocket_session_is_the_grpc_session(small_pod):
    """The same script on both doors: idle, an utterance, its playback_finished, idle, the end; the same
    messages in the same order, the audio returned sample for sample, and the same frames around it."""
    server, client = small_pod
    await no_session_running(server)
    speech = np.frombuffer(speech_pcm16(1.0), "<i2")

    drive = Driver(client.session("demo", unpaced=True, format="png"))
    await drive.until(drive.frame_at_least(10))
    await drive.send(speech.tobytes())
    await drive.session.flush()
    finished = (await drive.until(is_("playback_finished"))).playback_finished
    await drive.until(drive.frame_at_least(finished.tick + 10))
    grpc_recording = await drive.end()

    async def script(ws, received):
        await ws_until(ws, received, lambda b: b["type"] == "session_frame" and b["tick"] >= 10)
        await ws.send_bytes(speech.tobytes())
        await ws.send_str(json.dumps({"type": "flush"}))
        done = await ws_until(ws, received, lambda b: b["type"] == "playback_finished")
        await ws_until(ws, received, lambda b: b["type"] == "session_frame" and b["tick"] >= done["tick"] + 10)
        await ws.send_str(json.dumps({"type": "session_end"}))
        await ws_until(ws, received, lambda b: b["type"] == "session_ended")

    await no_session_running(server)
    received = await ws_session(server, {"format": "png"}, script)
    await conform_to_the_pods_openapi(server, received)
    ws_frames = [m for m in received if m["type"] == "session_frame"]
    ws_events = [m["type"] for m in received if m["type"] != "session_frame"]
    grpc_events = [e.WhichOneof("message") for e in grpc_recording.events]
    assert ws_events == ["session_started", "playback_finished", "session_ended"]
    assert grpc_events == ["started", "playback_finished", "ended"]
    assert [m["tick"] for m in ws_frames] == list(range(len(ws_frames)))
    ws_audio = np.frombuffer(b"".join(base64.b64decode(m["audio"]) for m in ws_frames), "<i2")
    for timeline in (ws_audio, grpc_recording.audio):
        at = placed_at(timeline, speech)
        np.testing.assert_array_equal(timeline[at : at + len(speech)], speech)
    ws_done = next(m for m in received if m["type"] == "playback_finished")
    assert (ws_done["utterance"], ws_done["samples"]) == (finished.utterance, finished.samples) == (1, len(speech))
    # Frames at the same place relative to the speech carry the same template and, where the speech landed on
    # the same sample of its tick, the same image.
    ws_at, grpc_at = placed_at(ws_audio, speech), placed_at(grpc_recording.audio, speech)
    ws_kinds = [m["kind"] for m in ws_frames]
    for kinds, at in ((ws_kinds, ws_at), (grpc_recording.kinds(), grpc_at)):
        speaking = [t for t, k in enumerate(kinds) if k == "speaking"]
        assert speaking == list(range(speaking[0], speaking[-1] + 1))  # one run, around the speech
        assert speaking[0] * TICK < at + len(speech) and speaking[-1] * TICK > at
    if ws_at % TICK == grpc_at % TICK:
        shift = (ws_at - grpc_at) // TICK
        for f in grpc_recording.frames:
            other = ws_frames[f.tick + shift] if 0 <= f.tick + shift < len(ws_frames) else None
            if other is not None and other["template_id"] == f.frame.template_id:
                assert base64.b64decode(other["frame"]) == f.frame.image


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (make setup)")
async def test_lipsync_client_session_writes_an_mp4_of_what_came_back(small_pod, tmp_path, capsys):
    """``lipsync client session``: idle, the file's speech, idle, muxed with the audio the session returned."""
    from inference_pod.cli import main
    from inference_pod.tools.synctalk_dataset import encode_wav_pcm16

    server, _ = small_pod
    await no_session_running(server)
    speech = tmp_path / "speech.wav"
    speech.write_bytes(encode_wav_pcm16(np.frombuffer(speech_pcm16(1.0), "<i2") / 32768.0))
    out = tmp_path / "session.mp4"
    argv = ["client", "--target", f"{LOOPBACK}:{server.port}", "session", "demo", str(speech), "--out", str(out),
            "--unpaced", "--idle-before", "0.4", "--idle-after", "1.2"]
    assert await asyncio.to_thread(main, argv) == 0
    summary = json.loads(capsys.readouterr().out)
    frames = summary["frames"]
    assert summary["ticks"] == summary["frames_received"] == sum(frames.values())
    # Frames whose audio window reaches the speech are speaking too (about 10 ticks each side), so at least
    # 10 idle ticks come before it and 30 - 10 after playback finished; a busy reader only adds idle ones.
    assert frames["speaking"] > 25 and frames["idle_cached"] + frames["idle_computed"] >= 25
    assert frames["repeated"] == summary["dropped"] == 0
    probe = await asyncio.to_thread(
        subprocess.run, ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,nb_frames", "-of", "csv=p=0",
                         str(out)], capture_output=True, text=True, check=True)
    streams = {kind: count for kind, count in (line.split(",")[:2] for line in probe.stdout.split())}
    assert int(streams["video"]) == summary["ticks"] and "audio" in streams

    missing = ["client", "--target", f"{LOOPBACK}:{server.port}", "session", "demo", str(tmp_path / "nope.wav")]
    assert await asyncio.to_thread(main, missing) != 0
    assert "nope.wav" in capsys.readouterr().err


async def test_a_paced_session_keeps_the_timeline_whatever_the_cpu_manages(small_pod):
    """Real time: every tick has its frame and its audio, the speech plays as sent, and every frame is
    counted as speaking, idle or repeated (how many of each depends on the machine, so is not asserted)."""
    server, client = small_pod
    await no_session_running(server)
    speech = np.frombuffer(speech_pcm16(1.0), "<i2")
    drive = Driver(client.session("demo"))
    started = (await drive.until(is_("started"))).started
    assert 0.45 < started.lookahead_s < 1.0
    await drive.until(drive.frame_at_least(10))
    await drive.send(speech.tobytes())
    await drive.session.flush()
    finished = (await drive.until(is_("playback_finished"))).playback_finished
    await drive.until(drive.frame_at_least(finished.tick + 5))
    recording = await drive.end()
    ended = recording.event("ended")[0]
    ticks = [f.tick for f in recording.frames]
    assert ticks == sorted(set(ticks)) and len(ticks) + ended.dropped_frames == ended.ticks
    assert ended.speaking_frames + ended.idle_cached_frames + ended.idle_computed_frames + \
        ended.repeated_frames == ended.ticks
    if not ended.dropped_frames:
        timeline = recording.audio
        at = placed_at(timeline, speech)
        np.testing.assert_array_equal(timeline[at : at + len(speech)], speech)
    assert all(f.pts == pytest.approx(f.tick / 25) for f in recording.frames)


# ------------------------------------------------------------------------------------------ operations


async def test_the_pods_session_counts_are_the_same_on_every_door(small_pod, capsys):
    """GetStats, /stats, /status, ``lipsync client stats`` and lipsync_sessions_utilization: one session of
    the one the pod admits is running, whoever asks."""
    from inference_pod.cli import main

    server, client = small_pod
    await no_session_running(server)
    drive = Driver(client.session("demo", unpaced=True))
    await drive.until(drive.frame_at_least(3))
    stats = await client.get_stats()
    assert (stats.sessions_active, stats.max_sessions) == (1, 1)
    assert {m.name: m.sessions_active for m in stats.models} == {"demo": 1}
    base = f"http://{LOOPBACK}:{server.data_plane.settings.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/stats") as response:
            http_stats = await response.json()
        async with http.get(f"{base}/status") as response:
            status = await response.json()
    assert (http_stats["sessions_active"], http_stats["max_sessions"]) == (1, 1)
    assert http_stats["sessions_refused"] == stats.sessions_refused
    assert [m["sessions_active"] for m in http_stats["models"]] == [1]
    assert (status["sessions_active"], status["max_sessions"]) == (1, 1)
    assert server.data_plane.metrics.sample("lipsync_sessions_utilization") == 1.0
    argv = ["client", "--target", f"{LOOPBACK}:{server.port}", "stats"]
    assert await asyncio.to_thread(main, argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["sessions_active"], printed["max_sessions"]) == (1, 1)

    recording = await drive.end()
    assert recording.event("ended")[0].reason == "ended"
    await no_session_running(server)
    stats = await client.get_stats()
    assert (stats.sessions_active, [m.sessions_active for m in stats.models]) == (0, [0])
    assert server.data_plane.metrics.sample("lipsync_sessions_utilization") == 0.0


async def test_a_draining_pod_ends_its_sessions_with_the_reason_before_their_streams_close(tmp_path):
    """SIGTERM (a rollout, a node drain) while sessions run: each gets its ended event, reason draining, and
    then its stream closes cleanly (gRPC OK; the WebSocket message before the socket closes), long before
    the grace period would have cut it."""
    models = models_dir_with(tmp_path / "models", "demo-1")
    pod = await Pod(settings_for(models, preload=["demo"], max_sessions=2)).start()
    client = AsyncLipSyncClient(f"{LOOPBACK}:{pod.port}", timeout=None)
    try:
        drive = Driver(client.session("demo", unpaced=True))
        await drive.until(drive.frame_at_least(3))
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(pod)) as ws:
            received: list[dict] = []
            await ws.send_str(json.dumps({"type": "session_start", "model_name": "demo", "unpaced": True}))
            await ws_until(ws, received, lambda body: body["type"] == "session_frame" and body["tick"] >= 3)
            stopping = asyncio.get_running_loop().create_task(pod.stop(grace_s=60))

            ended = (await drive.until(is_("ended"))).ended
            assert ended.reason == "draining"
            assert await anext(drive.responses, None) is None  # then the call's end, OK
            ws_ended = await ws_until(ws, received, lambda body: body.get("type") in ("session_ended", "error")
                                      or "closed" in body)
            assert (ws_ended.get("type"), ws_ended.get("reason")) == ("session_ended", "draining"), ws_ended
            await asyncio.wait_for(stopping, 30)  # well inside the 60 s grace: nothing was left running
    finally:
        await client.close()
        await pod.stop(grace_s=1)
