"""Live sessions over WebRTC (POST /webrtc/offer) against real pods on loopback, received by an aiortc peer
(inference_pod.bench.webrtc_receiver) that decodes both tracks as a browser would.

The trained demo idles, speaks and is stopped by a clear sent over the data channel; every measurement is
made on what arrived: the mouth's opening measured from the decoded video (the quality gate's measure)
against the envelope of the decoded Opus audio, lined up by their RTP timestamps; the frame pace read from
the RTP timestamps, never from the wall clock. The sync test runs unpaced (the session's clock is the
peer's reading), so a busy CPU drops no frame; the small pod's test runs paced, as a browser's session does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap
from pathlib import Path

import aiohttp
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
    started_pod,
    trained_demo_models,
)

from inference_pod.bench.webrtc_receiver import VIDEO_CLOCK, OfferRefused, WebRtcReceiver
from inference_pod.client import AsyncLipSyncClient
from inference_pod.serving.settings import Settings
from inference_pod.tools.demo_character import mouth_track, speech_track
from inference_pod.tools.lipsync_quality import (
    HELD_OUT_SPEECH,
    MIN_CORRELATION,
    mouth_opening_pixels,
    sync_score,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("one_torch_thread")]
FPS = 25
PTS_PER_FRAME = VIDEO_CLOCK // FPS


def settings_for(models_dir: Path, **overrides) -> Settings:
    values = {"host": LOOPBACK, "port": 0, "metrics_port": 0, "http_port": free_port(), "models_dir": models_dir,
              "max_batch": 8, "max_batch_delay_ms": 5, "encode_threads": 2, "webrtc_encode_threads": 2,
              "shutdown_grace_s": 5}
    values.update(overrides)
    return Settings(**values)


def base_url(server) -> str:
    return f"http://{LOOPBACK}:{server.data_plane.settings.http_port}"


async def no_session_running(server) -> None:
    await wait_until_async(lambda: not server.data_plane.sessions_active, what="the previous sessions to end",
                           timeout=60)


def frames_from(receiver: WebRtcReceiver, tick: int):
    return lambda r: bool(r.video) and receiver_tick(receiver, r.video[-1][0]) >= tick


def receiver_tick(receiver: WebRtcReceiver, pts: int) -> int:
    """The session tick of a received frame: its RTP timestamp counts from the first tick both tracks carried."""
    return receiver.received.events_of("media_started")[0]["tick"] + pts // PTS_PER_FRAME


# ------------------------------------------------------------------------------------------ the trained demo


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory) -> Path:
    return trained_demo_models(tmp_path_factory.mktemp("webrtc-models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trained_pod(trained_models):
    async with started_pod(settings_for(trained_models, preload=["demo"])) as pod:
        yield pod


@needs_espeak
async def test_a_webrtc_session_plays_in_sync_and_stops_at_a_clear_from_the_data_channel(trained_pod):
    server = trained_pod
    first = pcm16(speech_track(HELD_OUT_SPEECH[:1]))
    second = pcm16(speech_track(HELD_OUT_SPEECH[1:]))
    receiver = WebRtcReceiver(base_url(server), "demo", unpaced=True)
    try:
        answer = await receiver.connect()
        assert answer["type"] == "answer" and len(answer["session_id"]) == 16
        assert answer["codec"] in ("h264", "vp8")
        started = await receiver.event("session_started")
        assert (started["fps"], started["session_id"]) == (FPS, answer["session_id"])
        media = await receiver.event("media_started")
        await receiver.until(frames_from(receiver, media["tick"] + 40), what="40 idle frames")
        receiver.send_pcm(first)
        receiver.send("flush")
        finished = await receiver.event("playback_finished")
        await receiver.until(frames_from(receiver, finished["tick"] + 25), what="25 frames after the utterance")
        heard_before = len(receiver.received.audio)
        receiver.send_pcm(second)
        await receiver.until(lambda r: sum(np.abs(samples).max() > 2000 for _, samples in r.audio[heard_before:]) >= 40,
                             what="0.8 s of the second utterance heard")
        receiver.send("clear")
        cleared = await receiver.event("cleared")
        await receiver.until(frames_from(receiver, cleared["tick"] + 25), what="25 frames after the clear")
        receiver.send("session_end")
        ended = await receiver.event("session_ended")
    finally:
        await receiver.close()
    received = receiver.received
    assert ended["dropped"] == 0

    # The pace, from the RTP timestamps alone: one frame every 1/25 s of the 90 kHz clock, none missing.
    pts = np.array([p for p, _ in received.video])
    assert pts[0] == 0 and set(np.diff(pts)) == {PTS_PER_FRAME}, np.unique(np.diff(pts))

    # The mouth measured from the decoded video follows the decoded audio's envelope, peak at offset 0 +- 1.
    engine = server.data_plane.store.resident[0].engine
    t0 = media["tick"]
    ticks = [t0 + p // PTS_PER_FRAME for p in pts]
    measured = np.array([mouth_opening_pixels(image, engine.crop_box(engine.template_index(tick)))
                         for tick, (_, image) in zip(ticks, received.video, strict=True)])
    heard = received.audio_16k()  # its sample 0 plays with tick t0
    truth = mouth_track(heard, len(measured))[:, 0]
    voiced = np.flatnonzero(truth > 0.05)
    span = slice(max(0, voiced[0] - 10), finished["tick"] - t0 + 10)
    r0, peak, correlations = sync_score(measured[span], truth[span])
    print(f"webrtc ({answer['codec']}): r={r0:.3f} at offset 0, peak {peak:+d}, over {span.stop - span.start} frames")
    assert r0 >= MIN_CORRELATION and abs(peak) <= 1, (r0, peak, correlations)

    # Idle frames: the mouth closed (placed on the closed..open scale of the utterance, as in test_session).
    closed_level = np.median(measured[span][truth[span] < 0.02])
    open_level = np.median(measured[span][truth[span] > 0.5])
    scale = (measured - closed_level) / (open_level - closed_level)
    idle_before = scale[: max(1, voiced[0] - 15)]
    assert idle_before.mean() < 0.2 and idle_before.max() < 0.5, (idle_before.mean(), idle_before.max())

    # The clear: the video is idle within two frames of the tick it answered, and stays so.
    after_clear = scale[cleared["tick"] - t0 + 3 :]
    assert len(after_clear) >= 20 and after_clear.max() < 0.5, after_clear.round(2)
    assert scale[cleared["tick"] - t0 - 20 : cleared["tick"] - t0].max() > 0.5  # it was speaking before


# ------------------------------------------------------------------------------------------ a small pod


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def small_pod(tmp_path_factory):
    models = models_dir_with(tmp_path_factory.mktemp("small-webrtc-pod") / "models", "demo-1")
    async with started_pod(settings_for(models, preload=["demo"], max_sessions=1)) as pod:
        yield pod


async def test_a_paced_h264_session_at_a_chosen_size_and_a_refusal_past_max_sessions(small_pod):
    server = small_pod
    await no_session_running(server)
    receiver = WebRtcReceiver(base_url(server), "demo", codec="h264", width=64, height=48, bitrate_kbps=300)
    try:
        answer = await receiver.connect()
        assert answer["codec"] == "h264"
        await receiver.until(lambda r: len(r.video) >= 10, what="10 frames")

        # Past --max-sessions: 429 with the gRPC door's very words, and the running session keeps going.
        with pytest.raises(OfferRefused) as refused:
            await WebRtcReceiver(base_url(server), "demo").connect()
        assert refused.value.status == 429 and refused.value.body["code"] == "RESOURCE_EXHAUSTED"
        client = AsyncLipSyncClient(f"{LOOPBACK}:{server.port}", timeout=None)
        try:
            import grpc

            with pytest.raises(grpc.aio.AioRpcError) as grpc_refused:
                async for _ in client.session("demo"):
                    pass
        finally:
            await client.close()
        assert refused.value.body["error"] == grpc_refused.value.details()

        count = len(receiver.received.video)
        await receiver.until(lambda r: len(r.video) >= count + 10, what="10 more frames")
        receiver.send("session_end")
        await receiver.event("session_ended")
    finally:
        await receiver.close()
    video = receiver.received.video
    assert {image.shape for _, image in video} == {(48, 64, 3)}
    # Paced: a frame the peer could not take in time is dropped, so steps are whole frames, mostly one.
    steps = np.diff([p for p, _ in video])
    assert (steps % PTS_PER_FRAME == 0).all() and np.median(steps) == PTS_PER_FRAME
    await no_session_running(server)


@pytest.mark.parametrize(("body", "words"), [
    ({"model_name": "demo", "type": "offer"}, "'sdp' is required"),
    ({"model_name": "demo", "sdp": "v=0\r\nnonsense", "type": "offer"}, "offer"),
    ({"model_name": "demo", "sdp": "v=0\r\n", "type": "answer"}, "'type' must be \"offer\""),
    ({"model_name": "demo", "sdp": "v=0\r\n", "type": "offer", "width": 64}, "'width' and 'height' go together"),
    ({"model_name": "demo", "sdp": "v=0\r\n", "type": "offer", "codec": "av1"}, "'codec' must be one of"),
    ({"model_name": "demo", "sdp": "v=0\r\n", "type": "offer", "fps": 30}, "fps"),
])
async def test_a_bad_offer_is_one_clear_400(small_pod, body, words):
    async with aiohttp.ClientSession() as http, \
            http.post(f"{base_url(small_pod)}/webrtc/offer", json=body) as response:
        answer = await response.json()
    assert response.status == 400 and answer["code"] == "INVALID_ARGUMENT", answer
    assert words in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert not small_pod.data_plane.sessions_active


async def test_an_offer_from_a_page_the_pod_does_not_allow_is_refused(small_pod):
    body = {"model_name": "demo", "sdp": "v=0\r\n", "type": "offer"}
    async with aiohttp.ClientSession() as http, \
            http.post(f"{base_url(small_pod)}/webrtc/offer", json=body,
                      headers={"Origin": "https://elsewhere.example"}) as response:
        answer = await response.json()
    assert response.status == 403 and "--allowed-origins" in answer["error"], answer


# ------------------------------------------------------------------------------------------ a peer that vanishes

VANISHING_VIEWER = textwrap.dedent("""
    import asyncio, sys
    from inference_pod.bench.webrtc_receiver import WebRtcReceiver

    async def main():
        receiver = WebRtcReceiver(sys.argv[1], "demo", unpaced=True, width=64, height=48)
        await receiver.connect()
        await receiver.until(lambda r: len(r.video) >= 5, what="5 frames")
        print("watching", flush=True)
        await asyncio.Event().wait()  # until killed: no DTLS close, no ICE answer, nothing

    asyncio.run(main())
""")


@pytest_asyncio.fixture(loop_scope="module")
async def pod_with_one_slot(tmp_path):
    models = models_dir_with(tmp_path / "models", "demo-1")
    async with started_pod(settings_for(models, preload=["demo"], max_sessions=1, webrtc_consent_expiry_s=3)) as pod:
        yield pod


async def test_a_viewer_that_vanishes_ends_its_session_and_frees_its_slot(pod_with_one_slot):
    """An unpaced session's viewer is killed (no goodbye of any kind): the pod's consent checks go unanswered
    for --webrtc-consent-expiry-s, the connection closes, and the session ends although its video track was
    waiting for the viewer to read. Its slot is free again: the next viewer is admitted and plays."""
    server = pod_with_one_slot
    viewer = await asyncio.create_subprocess_exec(sys.executable, "-c", VANISHING_VIEWER, base_url(server),
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert viewer.stdout is not None
        line = await asyncio.wait_for(viewer.stdout.readline(), 120)
        assert line == b"watching\n", line
        assert server.data_plane.sessions_active
    finally:
        with contextlib.suppress(ProcessLookupError):
            viewer.send_signal(signal.SIGKILL)
        await viewer.wait()
    # The pod's consent expiry is 3 s here; the deadline leaves a loaded machine plenty of room, and is far
    # short of the 30 s that aioice's own checks (one unretransmitted try every 5 s, six misses) would take.
    await wait_until_async(lambda: not server.data_plane.sessions_active,
                           what="the vanished viewer's session to end", timeout=20)
    await wait_until_async(lambda: not server.gateway.webrtc.sessions, what="its peer connection to close")

    receiver = WebRtcReceiver(base_url(server), "demo", width=64, height=48)
    try:
        await receiver.connect()
        await receiver.until(lambda r: len(r.video) >= 5, what="5 frames for the next viewer")
        receiver.send("session_end")
        await receiver.event("session_ended")
    finally:
        await receiver.close()
