"""``lipsync bench pool``: the operator's placement code on simulated demand, dedicated pods against a pool."""

from __future__ import annotations

import json

import pytest

from inference_pod.bench.pool_bench import (
    PoolBenchConfig,
    daily_share,
    footprint_from_package,
    resolve_inputs,
    simulate,
)
from inference_pod.cli import main
from inference_pod.core.engine import Engine
from inference_pod.package import open_package


def small(**kw) -> PoolBenchConfig:
    return PoolBenchConfig(**{"characters": (300,), "zipf": (1.0,), "hours": 3.0, "warmup_s": 600.0,
                              "spikes_per_day": 2, "out_dir": None, **kw})


def test_a_pool_needs_a_fraction_of_the_dedicated_gpus_and_serves_the_demand():
    cfg = small()
    row = simulate(cfg, resolve_inputs(cfg), 300, 1.0)
    assert row["gpus_dedicated"] >= 300                    # one pod per character, at least
    assert row["gpus_pool"] * 10 <= row["gpus_dedicated"]
    assert row["demand_served"] >= 0.995
    assert 0 < row["memory_utilisation"] <= 1
    assert row["copies_added_per_hour"] > 0                # copies followed the demand
    assert row["steps"] == 180 and len(row["timeline"]) == 18


def test_too_small_a_pool_serves_less_and_says_so():
    # Pods that can carry hardly anything: the pool grows to its limit and still drops demand.
    cfg = small(pod_fps=30.0, max_pods=8)
    row = simulate(cfg, resolve_inputs(cfg), 300, 1.0)
    assert row["gpus_pool"] <= 8 and row["demand_served"] < 0.9 and row["pool_full_steps"] > 0


def test_the_same_seed_gives_the_same_run():
    cfg = small(hours=1.0)
    one, two = (simulate(cfg, resolve_inputs(cfg), 300, 1.2) for _ in range(2))
    for key in ("gpus_pool", "demand_served", "copies_added_per_hour", "cold_loads", "timeline"):
        assert one[key] == two[key]


def test_a_copy_serves_only_once_loaded():
    """--load-s: a load within the step changes nothing (the old assumption); a load of minutes leaves the
    spikes of cold characters, whose copies are all new, waiting."""
    runs = {load: simulate(cfg, resolve_inputs(cfg), 300, 1.0)
            for load, cfg in ((s, small(load_s=s, spikes_per_day=4)) for s in (0.0, 30.0, 600.0))}
    assert runs[30.0]["demand_served"] == runs[0.0]["demand_served"]
    assert runs[600.0]["spike_demand_served"] < runs[0.0]["spike_demand_served"]
    assert runs[600.0]["demand_served"] < runs[0.0]["demand_served"]


def test_load_s_comes_from_a_bench_load_json(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"rows": [{"store": {"first_frame_s": 1.5}}, {"store": {"first_frame_s": 2.5}}]}))
    inputs = resolve_inputs(small(load_json=path))
    assert (inputs["load_s"], inputs["load_s_source"]) == (2.5, f"bench load: {path}")
    pod_measured = {"rows": [{"store": {"first_frame_s": 1.5}, "pod": {"first_frame_s": 1.9}},
                             {"store": {"first_frame_s": 1.0}, "pod": {"first_frame_s": 1.2}}]}
    path.write_text(json.dumps(pod_measured))
    assert resolve_inputs(small(load_json=path))["load_s"] == 1.9  # what a pod's user waited, where measured


def test_daily_cycle_peaks_at_20h():
    assert daily_share(20 * 3600, 0.1) == pytest.approx(1.0)
    assert daily_share(8 * 3600, 0.1) == pytest.approx(0.1)


def test_the_footprint_of_a_package_covers_what_its_engine_holds(demo_package, one_torch_thread):
    footprint, source = footprint_from_package(demo_package, "fp32")
    package = open_package(demo_package)
    engine = Engine.from_package(package, device="cpu", precision="fp32")
    try:
        held = engine.memory_bytes()   # at load: one decoded full frame; the estimate counts all of them
        w, h = package.manifest.image_size
        assert held <= footprint <= held + package.manifest.frame_count * w * h * 3 + (1 << 20)
    finally:
        engine.close()
    assert source["frame_count"] == package.manifest.frame_count


def test_cli_writes_json_markdown_and_chart(tmp_path, capsys):
    out = tmp_path / "pool"
    assert main(["bench", "pool", "--characters", "200", "--zipf", "1.0,1.2", "--hours", "1", "--spikes", "1",
                 "--out-dir", str(out)]) == 0
    result = json.loads((out / "pool.json").read_text())
    assert [(s["characters"], s["zipf"]) for s in result["scenarios"]] == [(200, 1.0), (200, 1.2)]
    for s in result["scenarios"]:
        assert {"characters", "zipf", "gpus_dedicated", "gpus_pool", "demand_served"} <= set(s)
        assert 0 <= s["demand_served"] <= 1
    assert result["inputs"]["pod_fps_source"].startswith("assumed")
    assert "| characters |" in (out / "pool.md").read_text()
    assert (out / "pool.png").read_bytes()[:4] == b"\x89PNG"
    assert "GPUs pool" in capsys.readouterr().out


def test_a_bad_engine_json_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "engine.json"
    bad.write_text(json.dumps({"benchmark": "service"}))
    assert main(["bench", "pool", "--engine-json", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lipsync bench engine" in err[0]
    assert not (tmp_path / "o").exists()
