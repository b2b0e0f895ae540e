"""``lipsync bench pool``: the operator's placement code against a simulated day of demand, dedicated pods
against a LipSyncPool, side by side in one run.

The simulation steps through a day (``step_s`` at a time). Each step:

1. Demand arrives: concurrent live streams (``stream_fps`` frames/s each) follow a daily cycle between
   ``night_share`` and 1 of the peak (``peak_streams_per_character`` x characters, peak at 20:00); each
   stream picks a character by Zipf (rank^-s); the streams per character are Poisson around that. Now and
   then a cold character (from the long tail) spikes: it ramps to ``spike_streams`` in ``spike_ramp_s``,
   holds ``spike_hold_s`` and falls back.
2. The pool serves it with the copies placed at the previous step: a copy carries an equal part of its
   model's demand (a Service spreads connections evenly); a pod serves at most its capacity. A model
   without a copy serves nothing. Dedicated pods: one Deployment per character, min 1 pod, each pod the
   same capacity; counted as the pods its demand needs (their own HPA, without lag: generous to them).
3. The operator's code runs on what it measured: ``lipsync_operator.placement.place`` decides copies and
   loads/unloads; ``pods_needed`` (memory and load) sizes the pool, new pods serving ``pod_start_s`` later,
   surplus pods leaving one a minute once ``scale_down_s`` of lower demand has passed (the HPA's
   stabilisation window). A copy placed at time t serves from t + ``load_s`` (``--load-s``, or the slowest
   prepared-store load of a ``lipsync bench load`` JSON, ``--load-json``): in the step where it becomes ready
   for the part of the step left, and not at all before; with ``load_s`` at most a step it serves the whole
   next step, as a load that fits in one step does.

Numbers used (``config`` in the JSON says which were given):
- pod capacity: ``--pod-fps``, else the best end-to-end FPS of a ``lipsync bench engine`` JSON
  (``--engine-json``), else DEFAULT_POD_FPS, an assumption stated in the report (no GPU run is committed).
- footprint: estimated from a package manifest (``--package``) the way Engine.memory_bytes counts a loaded
  model, else from DEFAULT_CHARACTER (a one-minute 1280x720 character at 25 fps, SyncTalk_2D's width-32
  U-Net); ``--footprint-mb`` overrides both.
- pod model memory budget: ``--pod-memory-gib`` (the pool's ``modelMemoryBudget``).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from inference_pod.bench.report import machine_info, markdown_table, write_json
from lipsync_operator.placement import MIB, Model, Pod, place, pods_needed

DEFAULT_POD_FPS = 400.0          # assumption: one GPU pod, width 32 fp16, batched (see the module docstring)
MODEL_INPUT = 320               # the side of the engine's resident templates (device)
FRAME_CACHE_BYTES = 1 << 30      # Engine's default frame_budget_bytes: decoded full frames kept per model
UNET_PARAMS_W32 = 12_251_587     # LipSyncUNet("ave", 32)
ENCODER_PARAMS = 2_817_101       # AveAudioEncoder (fp32 in the engine)


class Character(TypedDict):
    """footprint_bytes's inputs that describe one character."""
    frame_count: int
    image_size: tuple[int, int]
    jpeg_bytes: int
    unet_params: int


DEFAULT_CHARACTER: Character = {"frame_count": 1500, "image_size": (1280, 720), "jpeg_bytes": 80_000,
                                "unet_params": UNET_PARAMS_W32}
HOUR = 3600.0
DAY = 24 * HOUR


@dataclass
class PoolBenchConfig:
    characters: tuple[int, ...] = (1000, 10000)
    zipf: tuple[float, ...] = (1.0, 1.2)
    hours: float = 24.0
    warmup_s: float = 3600.0          # simulated before the day, not counted: the pool has been running
    step_s: float = 60.0
    stream_fps: float = 25.0
    peak_streams_per_character: float = 0.25
    night_share: float = 0.1
    spikes_per_day: int = 8
    spike_streams: int = 40
    spike_ramp_s: float = 600.0
    spike_hold_s: float = 1800.0
    pod_fps: float | None = None
    engine_json: Path | None = None
    package: Path | None = None
    footprint_mb: float | None = None
    pod_memory_gib: float = 64.0
    precision: str = "fp16"
    demand_per_copy: float = 100.0   # frames/s one copy should carry (4 live streams)
    min_copies: int = 1
    max_copies: int = 100
    target_load: float = 0.7         # the pool HPA's target: load / capacity
    min_pods: int = 1
    max_pods: int = 100_000
    pod_start_s: float = 120.0
    scale_down_s: float = 300.0
    seed: int = 0
    load_s: float | None = None       # seconds from placing a copy to its first frame (None: --load-json, else 0)
    load_json: Path | None = None
    out_dir: Path | None = Path("bench-results/pool")
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ inputs

def footprint_bytes(frame_count: int, image_size: tuple[int, int], jpeg_bytes: int, unet_params: int,
                    precision: str = "fp16", encoder: bool = True) -> int:
    """What Engine.memory_bytes reports for a loaded character, the private memory a pod's budget counts:
    weights, resident templates (device), the encoded frames and up to FRAME_CACHE_BYTES of decoded full
    frames. The 328 crops for compositing are mapped from the node's prepared store (page cache, shared by
    the node's pods): not in the budget, so not here."""
    weights = unet_params * (4 if precision == "fp32" else 2) + (ENCODER_PARAMS * 4 if encoder else 0)
    templates = frame_count * MODEL_INPUT * MODEL_INPUT * 3
    decoded = min(frame_count * image_size[0] * image_size[1] * 3, FRAME_CACHE_BYTES)
    return weights + templates + frame_count * jpeg_bytes + decoded


def footprint_from_package(path: Path, precision: str) -> tuple[int, dict]:
    from inference_pod.package import AUDIO_ENCODER, UNET, read_manifest

    manifest = read_manifest(path)
    frames = [m for p, m in manifest.members.items() if p.startswith("frames/")]
    jpeg = int(sum(int(m["size"]) for m in frames) / max(1, len(frames)))
    unet_params = int(manifest.members[UNET]["size"]) // 4     # stored fp32
    source = {"package": manifest.name, "version": manifest.version, "frame_count": manifest.frame_count,
              "image_size": list(manifest.image_size), "jpeg_bytes": jpeg, "unet_params": unet_params}
    return footprint_bytes(manifest.frame_count, manifest.image_size, jpeg, unet_params, precision,
                           encoder=AUDIO_ENCODER in manifest.members), source


def pod_fps_from_engine_json(path: Path) -> float:
    result = json.loads(Path(path).read_text())
    rows = result.get("batched") or []
    if not rows:
        raise ValueError(f"{path} has no 'batched' rows: expected the JSON of `lipsync bench engine`")
    return max(float(r["end_to_end_fps"]) for r in rows)


def load_s_from_load_json(path: Path) -> float:
    """The slowest load from a prepared store to a first frame in a ``lipsync bench load`` JSON: a running
    pod's LoadModel to its first frame where the bench measured one, else the in-process load."""
    result = json.loads(Path(path).read_text())
    rows = result.get("rows") or []
    if not rows or "store" not in rows[0]:
        raise ValueError(f"{path} has no 'rows' with a 'store' load: expected the JSON of `lipsync bench load`")
    return max(float(r.get("pod", r["store"])["first_frame_s"]) for r in rows)


def resolve_inputs(cfg: PoolBenchConfig) -> dict:
    if cfg.pod_fps is not None:
        pod_fps, fps_source = cfg.pod_fps, "--pod-fps"
    elif cfg.engine_json is not None:
        pod_fps, fps_source = pod_fps_from_engine_json(cfg.engine_json), f"bench engine: {cfg.engine_json}"
    else:
        pod_fps, fps_source = DEFAULT_POD_FPS, "assumed (no GPU bench engine run committed yet)"
    fp_source: dict[str, Any]
    if cfg.footprint_mb is not None:
        footprint, fp_source = int(cfg.footprint_mb * MIB), {"given": "--footprint-mb"}
    elif cfg.package is not None:
        footprint, fp_source = footprint_from_package(cfg.package, cfg.precision)
    else:
        footprint = footprint_bytes(**DEFAULT_CHARACTER, precision=cfg.precision)
        fp_source = {"default_character": {**DEFAULT_CHARACTER, "image_size": list(DEFAULT_CHARACTER["image_size"])}}
    if pod_fps <= 0 or footprint <= 0:
        raise ValueError("pod capacity and footprint must be positive")
    if cfg.load_s is not None:
        load_s, load_source = cfg.load_s, "--load-s"
    elif cfg.load_json is not None:
        load_s, load_source = load_s_from_load_json(cfg.load_json), f"bench load: {cfg.load_json}"
    else:
        load_s, load_source = 0.0, "assumed: a copy serves from the step after it is placed"
    return {"pod_fps": pod_fps, "pod_fps_source": fps_source, "load_s": load_s, "load_s_source": load_source,
            "footprint_bytes": footprint,
            "footprint_source": fp_source, "pod_memory_bytes": int(cfg.pod_memory_gib * (1 << 30))}


# -------------------------------------------------------------------------------------- simulation

def daily_share(t: float, night: float) -> float:
    """Share of the peak streams at time t (seconds since midnight; negative: the day before): the peak at
    20:00, the trough at 08:00."""
    return night + (1 - night) * (0.5 + 0.5 * math.cos(2 * math.pi * ((t / HOUR) - 20) / 24))


def spike_streams(t: float, start: float, cfg: PoolBenchConfig) -> float:
    dt = t - start
    if dt < 0 or dt > 2 * cfg.spike_ramp_s + cfg.spike_hold_s:
        return 0.0
    if dt < cfg.spike_ramp_s:
        return cfg.spike_streams * dt / cfg.spike_ramp_s
    if dt <= cfg.spike_ramp_s + cfg.spike_hold_s:
        return float(cfg.spike_streams)
    return cfg.spike_streams * (2 * cfg.spike_ramp_s + cfg.spike_hold_s - dt) / cfg.spike_ramp_s


def simulate(cfg: PoolBenchConfig, inputs: dict, characters: int, zipf: float) -> dict:
    # Each step allocates thousands of short-lived objects beside ~10^5 long-lived ones (models, placements):
    # the cyclic garbage collector would spend 40 % of the run re-scanning the long-lived ones. Nothing
    # here makes reference cycles, so it is off for the run.
    gc.collect()
    gc.disable()
    try:
        return _simulate(cfg, inputs, characters, zipf)
    finally:
        gc.enable()


def _simulate(cfg: PoolBenchConfig, inputs: dict, characters: int, zipf: float) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    rng = np.random.default_rng([cfg.seed, characters, int(zipf * 1000)])
    names = [f"char-{i:05d}" for i in range(characters)]
    weights = 1.0 / np.arange(1, characters + 1) ** zipf
    weights /= weights.sum()
    cap, budget, footprint = inputs["pod_fps"], inputs["pod_memory_bytes"], inputs["footprint_bytes"]
    peak_streams = cfg.peak_streams_per_character * characters
    horizon = cfg.hours * HOUR
    warmup = int(round(cfg.warmup_s / cfg.step_s))
    steps = int(round(horizon / cfg.step_s))
    spike_starts = np.sort(rng.uniform(0, max(0.0, horizon - 2 * cfg.spike_ramp_s - cfg.spike_hold_s), cfg.spikes_per_day))
    spike_chars = rng.integers(characters // 2, characters, cfg.spikes_per_day)   # the cold half

    def model(i: int, demand: float) -> Model:
        return Model(names[i], footprint, demand_fps=demand, demand_per_copy=cfg.demand_per_copy,
                     min_copies=cfg.min_copies, max_copies=cfg.max_copies)

    idle = [model(i, 0.0) for i in range(characters)]
    last_model = list(idle)
    pod_seq = 0
    ready: dict[str, Pod] = {}
    pending: list[tuple[float, str]] = []        # (ready at, name)
    copies: dict[str, tuple[str, ...]] = {}
    ready_at: dict[tuple[str, str], float] = {}  # (model, pod) -> when a copy placed meanwhile serves its first frame
    load_s = float(inputs.get("load_s", 0.0))
    wanted: dict[str, int] = {}
    recent_needed: list[tuple[float, int]] = []  # (time, pods needed): the scale-down window
    last_scale_down = -math.inf

    def new_pod() -> str:
        nonlocal pod_seq
        pod_seq += 1
        return f"pod-{pod_seq:05d}"

    # The pool starts sized for its models' memory, all placed (as after the first reconciles).
    start_pods = max(cfg.min_pods, pods_needed([idle[0]] * characters, {}, budget, cap, cfg.target_load))
    for _ in range(start_pods):
        name = new_pod()
        ready[name] = Pod(name, budget, cap)
    plan = place(ready.values(), idle, {})
    copies, wanted = plan.copies, plan.wanted

    totals = {"demand": 0.0, "served": 0.0, "spike_demand": 0.0, "spike_served": 0.0, "loads": 0, "unloads": 0,
              "cold_loads": 0, "full_steps": 0, "pool_pod_s": 0.0, "dedicated_pod_s": 0.0, "memory_used": 0.0,
              "memory_total": 0.0}
    peak_pool = peak_dedicated = 0
    timeline = []
    for step in range(-warmup, steps):
        t = step * cfg.step_s
        counted = step >= 0
        # 1. demand (streams -> frames/s), Poisson per character, plus the spikes of cold characters.
        streams = rng.poisson(weights * peak_streams * daily_share(t, cfg.night_share)).astype(np.float64)
        spiking = set()
        for start, who in zip(spike_starts, spike_chars, strict=True):
            extra = spike_streams(t, start, cfg)
            if extra > 0:
                streams[who] += extra
                spiking.add(int(who))
        demand = streams * cfg.stream_fps
        active = np.flatnonzero(demand)

        # 2. serving: with the copies placed at the previous step.
        # A copy still loading serves nothing; one that becomes ready during the step serves what is left of it.
        step_end = t + cfg.step_s

        def serving(name: str, now_copies: dict[str, tuple[str, ...]] = copies, end: float = step_end
                    ) -> list[tuple[str, float]]:
            held = ((p, min(1.0, (end - ready_at.get((name, p), -math.inf)) / cfg.step_s))
                    for p in now_copies.get(name, ()))
            return [(p, w) for p, w in held if w > 0]

        pod_load: dict[str, float] = {}
        for i in active:
            held_w = serving(names[i])
            if not held_w:
                continue                          # no copy: none of it is served
            share = demand[i] / len(held_w)
            for pod, w in held_w:
                pod_load[pod] = pod_load.get(pod, 0.0) + share * w
        served = sum(min(load, cap) for load in pod_load.values())
        for who in spiking:   # what the spiking character got: its pods' served share
            held_w = serving(names[who])
            got = sum(demand[who] / len(held_w) * w * min(1.0, cap / pod_load[p]) for p, w in held_w) if held_w else 0.0
            if counted:
                totals["spike_demand"] += demand[who]
                totals["spike_served"] += got
        total_demand = float(demand.sum())
        dedicated = characters + int(sum(max(0, math.ceil(demand[i] / cap) - 1) for i in active))
        if counted:
            totals["demand"] += total_demand * cfg.step_s
            totals["served"] += served * cfg.step_s
            peak_dedicated = max(peak_dedicated, dedicated)
            totals["dedicated_pod_s"] += dedicated * cfg.step_s
            peak_pool = max(peak_pool, len(ready) + len(pending))
            totals["pool_pod_s"] += (len(ready) + len(pending)) * cfg.step_s

        # 3. the operator: measured demand -> placement; the pool's size follows memory and load.
        models = list(idle)
        for who in active:
            k, d = int(who), float(demand[who])
            if last_model[k].demand_fps != d:   # demand comes in whole streams: it often repeats
                last_model[k] = model(k, d)
            models[k] = last_model[k]
        for when, name in [p for p in pending if p[0] <= t]:
            ready[name] = Pod(name, budget, cap)
            pending.remove((when, name))
        needed = pods_needed(models, wanted, budget, cap, cfg.target_load)
        if plan.full is not None:     # the last round's copies did not fit: the operator asks for more pods
            needed = max(needed, len(ready) + plan.full.pods_to_add)
        needed = min(cfg.max_pods, max(cfg.min_pods, needed))
        recent_needed = [(w, n) for w, n in recent_needed if w > t - cfg.scale_down_s] + [(t, needed)]
        have = len(ready) + len(pending)
        for _ in range(needed - have):
            pending.append((t + cfg.pod_start_s, new_pod()))
        draining: set[str] = set()
        hold = max(n for _, n in recent_needed)
        if have > hold and not pending and t - last_scale_down >= 60.0:
            per_pod: dict[str, int] = {p: 0 for p in ready}
            for held in copies.values():
                for p in held:
                    per_pod[p] = per_pod.get(p, 0) + 1
            removable = min(have - hold, max(1, int(cfg.step_s // 60)))
            draining = set(sorted(ready, key=lambda p: (per_pod[p], p))[:removable])
            last_scale_down = t
        pool = [Pod(p.name, p.memory_bytes, p.capacity_fps, schedulable=p.name not in draining)
                for p in ready.values()]
        plan = place(pool, models, copies)
        for name in draining:
            del ready[name]
        if counted:
            totals["loads"] += len(plan.load)
            totals["unloads"] += len(plan.unload)
            totals["cold_loads"] += len({m for m, _ in plan.load if not copies.get(m)})   # none to serve meanwhile
            totals["full_steps"] += plan.full is not None
            totals["memory_used"] += sum(u.memory_bytes for p, u in plan.use.items() if p in ready)
            totals["memory_total"] += len(ready) * budget
        for key in plan.load:
            ready_at[(key[0], key[1])] = t + load_s
        for key in plan.unload:
            ready_at.pop((key[0], key[1]), None)
        copies, wanted = plan.copies, plan.wanted
        if counted and step % max(1, int(600 // cfg.step_s)) == 0:
            timeline.append({"hour": round(t / HOUR, 3), "demand_fps": round(total_demand, 1),
                             "pool_pods": len(ready) + len(pending), "dedicated_pods": dedicated,
                             "served_share": round(served / total_demand, 5) if total_demand else 1.0})

    hours = cfg.hours
    demand_served = totals["served"] / totals["demand"] if totals["demand"] else 1.0
    return {
        "characters": characters,
        "zipf": zipf,
        "gpus_dedicated": peak_dedicated,
        "gpus_pool": peak_pool,
        "gpu_ratio": peak_pool / peak_dedicated,
        "gpu_hours_dedicated": round(totals["dedicated_pod_s"] / HOUR, 1),
        "gpu_hours_pool": round(totals["pool_pod_s"] / HOUR, 1),
        "demand_served": round(demand_served, 6),
        "spike_demand_served": round(totals["spike_served"] / totals["spike_demand"], 4)
        if totals["spike_demand"] else None,
        "peak_demand_fps": round(peak_streams * cfg.stream_fps, 1),
        "copies_added_per_hour": round(totals["loads"] / hours, 1),
        "copies_removed_per_hour": round(totals["unloads"] / hours, 1),
        "cold_loads": totals["cold_loads"],
        "pool_full_steps": totals["full_steps"],
        "memory_utilisation": round(totals["memory_used"] / totals["memory_total"], 4),
        "steps": steps,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "timeline": timeline,
    }


# ------------------------------------------------------------------------------------------ report

COLUMNS = [("characters", "characters"), ("zipf", "Zipf s"), ("gpus_dedicated", "GPUs dedicated (peak)"),
           ("gpus_pool", "GPUs pool (peak)"), ("gpu_share", "pool / dedicated"),
           ("demand_served_pct", "demand served"), ("spike_served_pct", "cold-spike demand served"),
           ("copies_added_per_hour", "copies added / h"), ("copies_removed_per_hour", "copies removed / h"),
           ("cold_loads", "cold loads"), ("memory_pct", "memory used"), ("wall_s", "sim s"), ("cpu_s", "CPU s")]


def _table(scenarios: list[dict]) -> str:
    rows = [{**s, "gpu_share": f"{100 * s['gpu_ratio']:.2f} %", "demand_served_pct": f"{100 * s['demand_served']:.3f} %",
             "spike_served_pct": f"{100 * s['spike_demand_served']:.1f} %" if s["spike_demand_served"] is not None
             else None, "memory_pct": f"{100 * s['memory_utilisation']:.1f} %"} for s in scenarios]
    return markdown_table(rows, COLUMNS)


def run(cfg: PoolBenchConfig, log=print) -> dict:
    inputs = resolve_inputs(cfg)
    log(f"pod: {inputs['pod_fps']:.0f} frames/s ({inputs['pod_fps_source']}), "
        f"{inputs['pod_memory_bytes'] / (1 << 30):.0f} GiB for models; a character takes "
        f"{inputs['footprint_bytes'] / MIB:,.0f} MiB")
    scenarios = []
    for characters in cfg.characters:
        for zipf in cfg.zipf:
            row = simulate(cfg, inputs, characters, zipf)
            log(f"  {characters:>6} characters, Zipf {zipf}: {row['gpus_pool']} pool GPUs vs "
                f"{row['gpus_dedicated']} dedicated, {100 * row['demand_served']:.3f} % served ({row['wall_s']:.1f} s)")
            scenarios.append(row)
    config = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
              for k, v in asdict(cfg).items() if k not in ("out_dir", "extra")}
    result: dict[str, Any] = {"benchmark": "pool", "machine": machine_info("cpu"), "config": {**config, **cfg.extra},
              "inputs": inputs, "scenarios": scenarios}
    result["markdown"] = _markdown(result)
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        write_json(out / "pool.json", {k: v for k, v in result.items() if k != "markdown"})
        (out / "pool.md").write_text(result["markdown"] + "\n")
        result["files"] = {"json": out / "pool.json", "markdown": out / "pool.md",
                           "chart": write_chart(result, out / "pool.png")}
    return result


def _markdown(result: dict) -> str:
    cfg, inputs = result["config"], result["inputs"]
    return "\n".join([
        f"Pod: {inputs['pod_fps']:,.0f} frames/s ({inputs['pod_fps_source']}), "
        f"{inputs['pod_memory_bytes'] / (1 << 30):,.0f} GiB model memory; a character: "
        f"{inputs['footprint_bytes'] / MIB:,.0f} MiB. Demand: {cfg['peak_streams_per_character']} live streams "
        f"per character at the daily peak ({cfg['stream_fps']:g} frames/s each, {100 * cfg['night_share']:.0f} % "
        f"at night), {cfg['spikes_per_day']} spikes of a cold character to {cfg['spike_streams']} streams; "
        f"copies carry {cfg['demand_per_copy']:g} frames/s ({cfg['min_copies']}..{cfg['max_copies']}); "
        f"{cfg['hours']:g} h in {cfg['step_s']:g} s steps. A placed copy serves its first frame "
        f"{inputs.get('load_s', 0.0):g} s later ({inputs.get('load_s_source', 'assumed')}).",
        "",
        _table(result["scenarios"]),
    ])


def write_chart(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scenarios"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 8.4), constrained_layout=True)
    fig.suptitle("lipsync bench pool: GPUs for one Deployment per character vs a LipSyncPool", fontsize=11)
    ax = axes[0]
    x = np.arange(len(rows))
    labels = [f"{r['characters']:,} chars\nZipf {r['zipf']}" for r in rows]
    ded = ax.bar(x - 0.2, [r["gpus_dedicated"] for r in rows], 0.4, color="#ff7f0e", label="dedicated (peak)")
    pool = ax.bar(x + 0.2, [r["gpus_pool"] for r in rows], 0.4, color="#1f77b4", label="pool (peak)")
    ax.bar_label(ded, fontsize=8)
    ax.bar_label(pool, labels=[f"{r['gpus_pool']} ({100 * r['demand_served']:.2f} % served)" for r in rows],
                 fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("GPUs (log)")
    ax.legend(fontsize=8)
    ax = axes[1]
    first = rows[0]
    hours = [p["hour"] for p in first["timeline"]]
    ax.plot(hours, [p["pool_pods"] for p in first["timeline"]], color="#1f77b4", label="pool pods")
    ax.set_xlabel("hour of the day")
    ax.set_ylabel("pool pods")
    ax.set_ylim(0, max(p["pool_pods"] for p in first["timeline"]) * 1.25)
    ax.set_title(f"{first['characters']:,} characters, Zipf {first['zipf']}: pool size and demand over the day",
                 fontsize=10)
    demand = ax.twinx()
    demand.plot(hours, [p["demand_fps"] for p in first["timeline"]], color="#9e9e9e", linestyle="--",
                label="demand (frames/s)")
    demand.set_ylabel("frames/s")
    lines, more = ax.get_legend_handles_labels(), demand.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
