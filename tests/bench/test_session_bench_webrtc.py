"""``lipsync bench sessions --transport webrtc``: one short session (a tiny trained-demo character, VP8 at a
small size) over ``POST /webrtc/offer`` on the ``lipsync serve`` the benchmark starts, received and decoded
by an aiortc peer in the benchmark's process. Structure and consistency of the figures only: on a shared CPU
the session may repeat most of its frames, so nothing here asserts a pace."""

from __future__ import annotations

import json

import pytest

from inference_pod.bench.session_figures import KINDS
from inference_pod.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def webrtc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sessions-bench-webrtc")
    assert main(["bench", "sessions", "--transport", "webrtc", "--codec", "vp8", "--video-size", "320x240",
                 "--characters", "1", "--templates", "8", "--sessions", "1", "--duration-s", "2.5",
                 "--warm-up-s", "0", "--gap-s", "0.3,0.6", "--barge-in-share", "0.5", "--stop-repeated-share", "1",
                 "--no-progress", "--out-dir", str(out)]) == 0
    return out, json.loads((out / "sessions.json").read_text())


def test_the_session_ran_over_webrtc(webrtc_run):
    _, result = webrtc_run
    assert result["transport"] == "webrtc" and "webrtc (vp8 320x240)" in result["label"]
    assert result["config"]["codec"] == "vp8" and result["config"]["video_size"] == [320, 240]
    [row] = result["levels"]
    assert row["sessions_ran"] == 1 and row["refused"] == 0 and not row["errors"], row
    assert row["replies"] >= 1 and row["replies_cut"] + row["replies_finished"] == row["replies"], row


def test_frames_decoded_agree_with_the_pods_counts(webrtc_run):
    _, result = webrtc_run
    [row] = result["levels"]
    pod = row["pod_counts"]
    assert row["frames_received"] > 0, row
    # Every tick is accounted for: before the tracks started (connecting), decoded, or never received.
    assert row["ticks"] == row["ticks_before_media"] + row["frames_received"] + row["dropped"] == pod["ticks"], row
    # The video carries no kinds: they are the session's own, which count every tick.
    assert sum(row[k] for k in KINDS) == sum(pod[k] for k in KINDS) == pod["ticks"], row


def test_latency_and_av_offset_come_from_the_decoded_media(webrtc_run):
    _, result = webrtc_run
    [row] = result["levels"]
    # A frame counts as voiced from its decoded audio: audio sent now plays after the session's look-ahead.
    speech = row["speech_latency"]
    assert speech["count"] == 0 or 400 <= speech["p50_ms"] <= speech["p99_ms"], row
    assert row["barge_in_latency"]["count"] == row["barge_ins"], row
    assert row["av_timestamp_offset_ms"] is not None and row["av_timestamp_offset_ms"] >= 0, row
    assert row["av_pixel_sync"] is None  # no crop box on a video track: the pixel measure is gRPC's


def test_cpu_per_session_is_measured_for_the_pod_and_the_client(webrtc_run):
    out, result = webrtc_run
    [row] = result["levels"]
    assert row["pod_cpu_s"] > 0 and row["client_cpu_s"] > 0, row  # encoding there, decoding here
    for who in ("pod", "client"):
        assert row[f"{who}_cpu_per_session"] == pytest.approx(row[f"{who}_cpu_s"] / row["wall_s"], abs=1e-3)
    table = (out / "sessions.md").read_text()
    assert "pod CPU / session" in table and "client CPU / session" in table
    assert (out / "sessions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--codec", "vp8"], "--transport webrtc"),
    (["--video-size", "1280x720"], "--transport webrtc"),
])
def test_video_options_need_the_webrtc_transport(tmp_path, capsys, args, words):
    assert main(["bench", "sessions", *args, "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()
