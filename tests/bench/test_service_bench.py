"""``lipsync bench service``: a short version of every scenario against the server it starts (a real
``lipsync serve`` subprocess on 127.0.0.1), the same against a running pod given by ``--target``, and the
pieces the figures rest on (live-stream deadlines against the server's own streaming code, frame ids that
avoid the frame cache). Structure, counts and success rates only: nothing here asserts a speed."""

from __future__ import annotations

import json
import math
import socket

import cv2
import pytest
from serving_support import ServerThread, models_dir_with, package, speech_pcm16

from inference_pod.bench.live_streams import audio_needed, run_level, stream_levels
from inference_pod.bench.request_driver import FrameIds
from inference_pod.bench.service_bench import SCENARIOS, ServiceBenchConfig, run
from inference_pod.cli import main
from inference_pod.core import audio
from inference_pod.core.engine import Engine
from inference_pod.core.live_features import LiveTrack
from inference_pod.serving.settings import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GENERATION = ("sequential", "batch5", "batch50", "concurrent", "multi-sequential", "multi-concurrent", "multi-mixed",
              "stress")


# ------------------------------------------------------------------------------------------ the whole run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every scenario, a few frames each, against the server the benchmark starts with 3 tiny demo models.
    --max-batch 8 keeps the 50-frame batches quick on a small CPU; the rest are the pod's defaults."""
    out = tmp_path_factory.mktemp("service-bench")
    cfg = ServiceBenchConfig.preset(quick=True, models=3, width=4, frame_size=(48, 48), frames=5, clients=2,
                                    streams=2, stream_seconds=1.0, stress_sizes=(10, 20), cache_pairs=3,
                                    torch_threads=1, server_args=("--max-batch", "8"), out_dir=out, progress=False)
    return cfg, run(cfg, log=lambda *_: None)


def rows_by_scenario(result: dict) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for row in result["scenarios"]:
        by.setdefault(row["scenario"], []).append(row)
    return by


def test_every_scenario_ran_and_every_frame_came_back(quick_run):
    cfg, result = quick_run
    by = rows_by_scenario(result)
    assert set(by) == {*GENERATION, "cache", "engine-sequential", "engine-batch50", "outputs-prediction",
                       "outputs-full"}
    assert result["live"]["levels"] and not result["skipped"]
    for row in result["scenarios"]:
        assert row["success_rate"] == 1.0, row
        assert row["ok_frames"] == row["sent_frames"] == row["planned_frames"], row
        assert not row["errors"] and not row["cut_by_deadline"], row
        assert row["fps"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
    assert by["sequential"][0]["requests"] == 5
    assert (by["batch5"][0]["requests"], by["batch5"][0]["ok_frames"]) == (1, 5)
    assert (by["batch50"][0]["requests"], by["batch50"][0]["ok_frames"]) == (1, 50)
    assert by["concurrent"][0]["clients"] == 2
    assert by["multi-concurrent"][0]["clients"] == by["multi-concurrent"][0]["models"] == 3
    assert by["multi-sequential"][0]["ok_frames"] == 3  # frames // models per model, every model
    assert [r["stress_frames"] for r in by["stress"]] == [10, 20]
    assert [r["ok_frames"] for r in by["stress"]] == [10, 20]
    assert result["server"]["models"] == ["bench0", "bench1", "bench2"]
    assert result["server"]["max_batch"] == 8  # --server-args reached the server
    assert result["tracks_wrapped"] == []


def test_generation_is_measured_not_the_cache(quick_run):
    _, result = quick_run
    by = rows_by_scenario(result)
    for name in (*GENERATION, "outputs-prediction", "outputs-full"):
        assert all(r["cache_hits"] == 0 for r in by[name]), name
    cache = by["cache"][0]
    assert cache["first_request_cache_hits"] == 0
    assert cache["cache_hits"] == cache["ok_frames"] == 3 and cache["hit_rate"] == 1.0


def test_region_and_full_frames_side_by_side_with_the_pods_cpu_time(quick_run):
    _, result = quick_run
    by = rows_by_scenario(result)
    region, full = by["outputs-prediction"][0], by["outputs-full"][0]
    assert (region["output_region"], full["output_region"]) == ("prediction", "full")
    assert region["ok_frames"] == full["ok_frames"] == 5
    assert full["fps_vs_region"] == pytest.approx(full["fps"] / region["fps"])
    # The benchmark started the pod, so it reads the pod's CPU time: five frames (a U-Net pass and an image
    # each, plus their gRPC calls) are several of /proc's 10 ms clock ticks, never none.
    for row in (region, full):
        assert row["pod_cpu_ms_per_frame"] > 0, row
        assert row["fps_per_pod_core"] == pytest.approx(1000 / row["pod_cpu_ms_per_frame"])
    assert result["identity_network"] is False and "IDENTITY" not in result["label"]


def test_identity_network_only_when_asked_and_named_in_the_results(tmp_path):
    cfg = ServiceBenchConfig.preset(quick=True, models=1, width=4, frame_size=(48, 48), frames=4, clients=1,
                                    scenarios=("outputs",), identity_network=True, torch_threads=1,
                                    out_dir=tmp_path, progress=False)
    result = run(cfg, log=lambda *_: None)
    assert result["identity_network"] is True and "BENCHMARK IDENTITY NETWORK" in result["label"]
    assert json.loads((tmp_path / "service.json").read_text())["config"]["identity_network"] is True
    assert "BENCHMARK IDENTITY NETWORK" in (tmp_path / "service.md").read_text()
    assert all(r["success_rate"] == 1.0 for r in result["scenarios"])


def test_in_process_engine_runs_the_same_frames(quick_run):
    _, result = quick_run
    by = rows_by_scenario(result)
    assert by["engine-sequential"][0]["ok_frames"] == by["sequential"][0]["ok_frames"]
    assert by["engine-batch50"][0]["ok_frames"] == by["batch50"][0]["ok_frames"]
    overhead = {o["comparison"]: o for o in result["overhead"]}
    # Each comparison sets the service's own measurement against the engine's on the same frames.
    pairs = {"single frames": ("sequential", "engine-sequential"), "50-frame batches": ("batch50", "engine-batch50")}
    assert set(overhead) == set(pairs)
    for label, (service, engine) in pairs.items():
        o, s, e = overhead[label], by[service][0], by[engine][0]
        assert (o["service_fps"], o["engine_fps"]) == (s["fps"], e["fps"]), label
        assert (o["service_p50_ms"], o["engine_p50_ms"]) == (s["p50_ms"], e["p50_ms"]), label


def test_live_streams_deliver_every_frame_of_every_stream(quick_run):
    _, result = quick_run
    live = result["live"]
    assert live["levels_tried"] == [r["streams"] for r in live["levels"]] and live["levels_tried"][0] == 1
    per_stream = audio.frame_count(int(1.0 * audio.SAMPLE_RATE))
    for level in live["levels"]:
        assert level["planned_frames"] == level["streams"] * per_stream
        assert level["ok_frames"] == level["planned_frames"] and level["success_rate"] == 1.0
    clean = 0
    for level in live["levels"]:
        if level["missed"]:
            break
        clean = level["streams"]
    assert live["largest_streams_without_miss"] == clean


def test_json_markdown_and_chart_are_written(quick_run):
    cfg, result = quick_run
    files = {k: cfg.out_dir / name for k, name in (("json", "service.json"), ("markdown", "service.md"),
                                                    ("chart", "service.png"))}
    assert {k: str(v) for k, v in files.items()} == result["files"]
    saved = json.loads(files["json"].read_text())
    assert saved["scenarios"] == json.loads(json.dumps(result["scenarios"]))
    assert saved["machine"]["cpu_count"] >= 1 and saved["label"]
    markdown = files["markdown"].read_text()
    assert markdown.startswith(f"**lipsync bench service**: {result['label']}")
    for row in result["scenarios"]:
        assert f"| {row['label']} |" in markdown
    assert "Largest M with no missed deadline" in markdown and "| single frames |" in markdown
    image = cv2.imread(str(files["chart"]))
    assert image is not None and image.shape[0] > 500 and image.shape[1] > 500


def test_the_server_it_started_is_gone(quick_run):
    _, result = quick_run
    host, port = result["server"]["target"].split(":")
    assert host == "127.0.0.1"
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


# ------------------------------------------------------------------------------------------ --target


@pytest.fixture
def pod(tmp_path):
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, models_dir=models_dir_with(
        tmp_path / "models", "demo-1", "other-1"), http_port=0, max_batch=8, max_batch_delay_ms=5, encode_threads=2)
    server = ServerThread(settings)
    yield server
    server.close()


def test_cli_against_a_running_pod(pod, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "service", "--target", pod.target, "--package", str(package("demo-1")), "--models", "2",
                 "--frames", "4", "--clients", "2", "--streams", "1", "--stream-seconds", "1", "--cache-pairs", "2",
                 "--scenarios", "sequential,engine,multi-concurrent,cache,live", "--no-progress",
                 "--out-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "service.json").read_text())
    assert result["server"]["started_by_benchmark"] is False and result["server"]["models"] == ["demo", "other"]
    assert result["server"]["max_batch"] == 8 and result["server"]["device"] == "cpu"
    assert [r["scenario"] for r in result["scenarios"]] == ["sequential", "engine-sequential", "engine-batch50",
                                                            "multi-concurrent", "cache"]
    assert all(r["success_rate"] == 1.0 for r in result["scenarios"])
    assert [lv["streams"] for lv in result["live"]["levels"]] == [1]
    assert "| sequential single frames |" in printed and str(out / "service.png") in printed


def test_engine_comparison_needs_the_package_with_a_target(pod, tmp_path):
    cfg = ServiceBenchConfig.preset(target=pod.target, models=1, frames=2, scenarios=("sequential", "engine"),
                                    out_dir=tmp_path, progress=False)
    result = run(cfg, log=lambda *_: None)
    assert [r["scenario"] for r in result["scenarios"]] == ["sequential"]
    assert "engine" in result["skipped"] and "engine skipped" in result["markdown"]


def test_a_track_too_short_for_the_run_shows_as_cache_hits(pod, tmp_path):
    cfg = ServiceBenchConfig.preset(target=pod.target, models=1, frames=40, scenarios=("sequential",),
                                    out_dir=tmp_path, progress=False)
    result = run(cfg, log=lambda *_: None)
    track = result["server"]["default_track_frames"]["demo"]
    warm = 1 + 8  # a frame of every model, then a batch of 8 of the first
    assert warm + 40 > track
    row = result["scenarios"][0]
    assert result["tracks_wrapped"] == ["demo"]
    assert row["ok_frames"] == 40 and row["cache_hits"] == warm + 40 - track  # every id asked for before
    assert "default tracks too short" in result["markdown"]


# ------------------------------------------------------------------------------------------ the pieces


def test_live_frames_past_their_deadline_are_counted_as_missed(pod):
    """The same streams against a deadline nothing can meet and one nothing can miss: every frame, then no
    frame, counts as missed; frames that arrive all arrive either way."""
    def level(budget_ms: float) -> dict:
        return run_level(pod.target, "demo", 1, seconds=1.0, chunk_ms=40.0, budget_ms=budget_ms)

    # Frames flushed at the half-close start their clocks a playback period apart, so a quick pod delivers
    # the last few before their clocks start: only a deadline a second before every clock cannot be met.
    impossible, lenient = level(-1e3), level(1e7)
    for row in (impossible, lenient):
        assert row["ok_frames"] == row["planned_frames"] == audio.frame_count(audio.SAMPLE_RATE), row
    assert (impossible["missed"], impossible["miss_share"]) == (impossible["planned_frames"], 1.0)
    assert (lenient["missed"], lenient["miss_share"]) == (0, 0.0)



def test_live_deadlines_start_when_the_server_can_first_compute_the_frame(demo_character_package):
    """``audio_needed`` is the benchmark's reading of inference_pod/core/live_features.py; hold it to the real code:
    fed 10 ms at a time, every frame must become ready at the first push that reaches audio_needed."""
    engine = Engine.from_package(demo_character_package)
    live = LiveTrack(engine, audio.SAMPLE_RATE)
    pcm, step = speech_pcm16(2.0), 160
    ready_at = {}
    for pos in range(0, len(pcm) // 2, step):
        for frame_id, _ in live.push(pcm[2 * pos : 2 * (pos + step)]):
            ready_at[frame_id] = min(pos + step, len(pcm) // 2)
    assert len(ready_at) > 20
    for frame_id, samples in ready_at.items():
        assert samples == math.ceil(audio_needed(frame_id) / step) * step, frame_id
    assert audio_needed(0) == int(0.45 * audio.SAMPLE_RATE)  # the documented 0.45 s look-ahead


def test_stream_levels():
    assert stream_levels(1) == [1]
    assert stream_levels(4) == [1, 2, 3, 4]
    assert stream_levels(20) == [1, 2, 3, 4, 6, 9, 13, 19, 20]
    assert stream_levels(0) == []


def test_frame_ids_are_new_until_a_track_runs_out():
    ids = FrameIds({"a": 10, "b": 3})
    first, second = ids.take("a", 4), ids.take("a", 6)
    assert first + second == list(range(10)) and not ids.wrapped
    assert ids.take("b", 5) == [0, 1, 2, 0, 1] and ids.wrapped == {"b"}


def test_presets():
    full, quick = ServiceBenchConfig.preset(), ServiceBenchConfig.preset(quick=True)
    assert full.scenarios == quick.scenarios == SCENARIOS
    assert (full.models, full.frames, full.stress_sizes, full.width) == (6, 100, (100, 1000), 4)
    assert quick.frames < full.frames and quick.stress_sizes < full.stress_sizes
    assert ServiceBenchConfig.preset(quick=True, frames=7, width=None).frames == 7  # given values win, None ignored
    assert ServiceBenchConfig.preset(device="cuda").width == 32  # the full-width model where it can run
    with pytest.raises(ValueError, match="unknown scenarios"):
        ServiceBenchConfig.preset(scenarios=("sequential", "warp"))
    with pytest.raises(SystemExit):
        main(["bench", "service", "--scenarios", "warp"])


def test_pod_with_the_identity_network_says_so_in_its_metrics_and_serves_template_regions(pod, tmp_path, caplog):
    from inference_pod.client import LipSyncClient
    from inference_pod.core.encoding import decode_image
    from inference_pod.package import open_package

    assert pod.server.data_plane.metrics.sample("lipsync_benchmark_identity_network") == 0  # never a default
    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, http_port=0, benchmark_identity_network=True,
                        models_dir=models_dir_with(tmp_path / "models", "demo-1"), preload=["demo"])
    with caplog.at_level("WARNING"):
        identity = ServerThread(settings)
    try:
        assert identity.server.data_plane.metrics.sample("lipsync_benchmark_identity_network") == 1
        assert "BENCHMARK IDENTITY NETWORK" in caplog.text
        engine = Engine.from_package(open_package(package("demo-1")), max_batch=1)
        with LipSyncClient(identity.target) as client:
            frame = client.generate_frame("demo", 0, format="png", region="prediction")
        assert (decode_image(frame.image, "png") == engine.template_crop(frame.template_id)).all()
    finally:
        identity.close()
