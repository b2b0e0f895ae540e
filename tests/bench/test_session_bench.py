"""``lipsync bench sessions``: a short run (1 then 2 real-time sessions, a couple of seconds each, two small
characters, the first the trained demo) against the real ``lipsync serve`` the benchmark starts. Structure
and consistency of the figures only: on a shared CPU the sessions may repeat most of their frames, so
nothing here asserts a pace or a repeated-frame share."""

from __future__ import annotations

import json

import pytest

from inference_pod.bench import SESSION_TRANSPORTS
from inference_pod.bench.session_figures import KINDS
from inference_pod.bench.session_transport import TRANSPORTS
from inference_pod.bench.sessions import largest_within
from inference_pod.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Through the command line, as a user runs it: every level runs whatever it repeats (stop share 1);
    half the replies are cut by a barge-in."""
    out = tmp_path_factory.mktemp("sessions-bench")
    assert main(["bench", "sessions", "--characters", "2", "--templates", "8", "--sessions", "2,1",
                 "--duration-s", "2.5", "--warm-up-s", "1.5", "--gap-s", "0.3,0.6", "--barge-in-share", "0.5",
                 "--stop-repeated-share", "1", "--no-progress", "--out-dir", str(out)]) == 0
    return out, json.loads((out / "sessions.json").read_text())


def test_every_level_ran_every_session(short_run):
    _, result = short_run
    assert [r["sessions"] for r in result["levels"]] == [1, 2] and not result["stopped_early"]
    assert result["transport"] == "grpc" and result["machine"]["cpu_count"] >= 1
    assert result["config"]["barge_in_share"] == 0.5 and result["config"]["gap_s"] == [0.3, 0.6]
    assert [c["weights"] for c in result["characters"]] == ["trained demo", "random"]
    for row in result["levels"]:
        assert row["sessions_ran"] == row["sessions"] and row["refused"] == 0 and not row["errors"], row
        assert row["replies"] >= row["sessions"], row  # each session replied at least once


def test_frame_counts_agree_with_the_pods_own(short_run):
    _, result = short_run
    for row in result["levels"]:
        pod = row["pod_counts"]
        # What the client saw by kind is what the sessions say they emitted, less what they dropped.
        assert sum(row[k] for k in KINDS) == row["frames_received"], row
        assert row["ticks"] == row["frames_received"] + row["dropped"] == pod["ticks"], row
        assert pod["dropped"] == row["dropped"] and sum(pod[k] for k in KINDS) == pod["ticks"], row
        assert all(row[k] <= pod[k] for k in KINDS), row
        assert row["repeated_share"] == pytest.approx(row["repeated"] / row["frames_received"])
        # The warm-up made every template's idle frame: idle frames came from the cache, each a call saved.
        assert row["network_calls_saved"] == row["idle_cached"] > 0, row
        assert row["network_frames"] == row["speaking"] + row["idle_computed"]


def test_latencies_and_barge_ins_are_measured(short_run):
    _, result = short_run
    rows = result["levels"]
    cut = sum(r["replies_cut"] for r in rows)
    finished = sum(r["replies_finished"] for r in rows)
    assert cut and finished, "the seeded patterns should cut some replies and finish others"
    for row in rows:
        assert row["replies_cut"] + row["replies_finished"] == row["replies"], row
        speech = row["speech_latency"]
        assert speech["count"] >= row["replies_finished"], row
        # Audio sent now plays after the session's look-ahead (0.45 s of windows and more): never sooner.
        assert speech["count"] == 0 or 400 <= speech["p50_ms"] <= speech["p99_ms"], row
        barge = row["barge_in_latency"]
        assert barge["count"] == row["barge_ins"] == row["replies_cut"], row
        assert sum(row["barge_in_next_kinds"].values()) == row["barge_ins"], row
        assert row["barge_in_next_kinds"].get("speaking", 0) == 0, row  # the tick after a clear never speaks
        if row["barge_ins"]:
            assert 0 < barge["p50_ms"] <= barge["p99_ms"], row


def test_av_offsets(short_run):
    _, result = short_run
    for row in result["levels"]:
        assert row["av_timestamp_offset_ms"] == 0.0, row  # gRPC: each frame carries its own tick's audio
        sync = row["av_pixel_sync"]  # the trained demo's sessions, measured from their pixels
        assert sync is not None and sync["sessions"] >= 1 and sync["frames"] > 0, row
        assert -1 <= sync["r_at_0"] <= 1 and abs(sync["peak_offset_frames"]) <= 6
        assert sync["peak_offset_ms"] == pytest.approx(40.0 * sync["peak_offset_frames"])


def test_files_and_the_largest_m(short_run):
    out, result = short_run
    assert result["largest_sessions_within"] == largest_within(result["levels"], result["max_repeated_share"])
    assert result["max_repeated_share"] == 0.01
    table = (out / "sessions.md").read_text()
    assert "lipsync bench sessions" in table and result["machine"]["cpu"] in table
    assert table.count("\n| 1 |") == table.count("\n| 2 |") == 1
    assert (out / "sessions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_largest_m_stops_at_the_first_level_past_the_bar():
    def row(m, share, errors=None):
        return {"sessions": m, "sessions_ran": m, "errors": errors or {}, "repeated_share": share}

    assert largest_within([row(1, 0.0), row(2, 0.01), row(4, 0.02), row(8, 0.0)], 0.01) == 2
    assert largest_within([row(1, 0.5)], 0.01) == 0
    assert largest_within([row(1, 0.0), row(2, 0.0, {"UNAVAILABLE: gone": 1})], 0.01) == 1


def test_transports_are_named_where_the_cli_offers_them():
    assert set(SESSION_TRANSPORTS) == set(TRANSPORTS)


@pytest.mark.parametrize("args, words", [
    (["--target", "127.0.0.1:1"], "--models"),
    (["--models", "alice"], "--target"),
    (["--target", "127.0.0.1:1", "--models", "a", "--sync-model", "b"], "--sync-model"),
])
def test_bad_options_are_one_clear_line(tmp_path, capsys, args, words):
    assert main(["bench", "sessions", *args, "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()
