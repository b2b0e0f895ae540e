"""The request scenarios of ``lipsync bench service``: the replaced service's, plus a cache-hit one.

Each scenario plans its requests (frames of the models' default tracks, never one asked for earlier in the
run, so generation is measured, not the frame cache), drives them through ``request_driver`` and returns
table rows. ``models[0]`` serves the single-model scenarios; the multi-model ones use all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from inference_pod.bench.bench_server import DEMO_TEMPLATES
from inference_pod.bench.report import latency_summary
from inference_pod.bench.request_driver import (
    FrameIds,
    Job,
    Tally,
    batch,
    connect,
    drive,
    execute,
    single,
    split_round_robin,
)

MIXED_BATCH = 5  # items of the mixed scenario's batches
OUTPUTS_BATCH = 8  # items of the outputs scenario's batches
OUTPUTS_WARMUP_MAX = 1000  # most frames the outputs scenario spends on one frame of each template


@dataclass
class ScenarioContext:
    target: str
    models: list[str]
    ids: FrameIds
    frames: int = 100  # frames per scenario
    clients: int = 4
    stress_sizes: tuple[int, ...] = (100, 1000)
    cache_pairs: int = 20
    max_seconds: float = 300.0  # per scenario
    timeout_s: float = 60.0  # per request
    api_key: str | None = None
    progress: bool = True
    seed: int = 0
    frame_ids: dict[str, list[int]] = field(default_factory=dict)  # ids each scenario used, for the engine
    templates: dict[str, int] = field(default_factory=dict)  # template frames of each model
    pod_cpu_seconds: Callable[[], float | None] = lambda: None  # the pod process's CPU time, when known

    @property
    def model(self) -> str:
        return self.models[0]

    def drive(self, queues: list[list[Job]], desc: str) -> Tally:
        return drive(self.target, queues, max_seconds=self.max_seconds, timeout_s=self.timeout_s,
                     api_key=self.api_key, progress=self.progress, desc=desc)


def sequential(ctx: ScenarioContext) -> list[dict]:
    """One client, one frame per request, each request after the previous answer."""
    ids = ctx.ids.take(ctx.model, ctx.frames)
    ctx.frame_ids["sequential"] = ids
    tally = ctx.drive([[single(ctx.model, i) for i in ids]], "sequential")
    return [tally.row("sequential", "sequential single frames", clients=1, batch=1)]


def batches(size: int) -> Callable[[ScenarioContext], list[dict]]:
    """One client, ``size`` consecutive frames per GenerateBatch request."""

    def scenario(ctx: ScenarioContext) -> list[dict]:
        n = math.ceil(ctx.frames / size) * size
        ids = ctx.ids.take(ctx.model, n)
        ctx.frame_ids[f"batch{size}"] = ids
        jobs = [batch([(ctx.model, i) for i in ids[s : s + size]]) for s in range(0, n, size)]
        tally = ctx.drive([jobs], f"batches of {size}")
        return [tally.row(f"batch{size}", f"{size}-frame batches", clients=1, batch=size)]

    scenario.__doc__ = f"One client, {size} frames per GenerateBatch request."
    return scenario


def concurrent(ctx: ScenarioContext) -> list[dict]:
    """``clients`` clients at once, single frames of one model (the server batches them together)."""
    ids = ctx.ids.take(ctx.model, ctx.frames)
    tally = ctx.drive(split_round_robin([single(ctx.model, i) for i in ids], ctx.clients), "concurrent")
    return [tally.row("concurrent", f"{ctx.clients} concurrent clients", clients=ctx.clients, batch=1)]


def _per_model(ctx: ScenarioContext) -> dict[str, list[int]]:
    per = max(1, ctx.frames // len(ctx.models))
    return {m: ctx.ids.take(m, per) for m in ctx.models}


def multi_sequential(ctx: ScenarioContext) -> list[dict]:
    """One client, single frames, each request for the next model in turn."""
    ids = _per_model(ctx)
    jobs = [single(m, ids[m][k]) for k in range(len(ids[ctx.model])) for m in ctx.models]
    tally = ctx.drive([jobs], f"{len(ctx.models)} models, sequential")
    return [tally.row("multi-sequential", f"{len(ctx.models)} models, sequential", clients=1, batch=1,
                      models=len(ctx.models))]


def multi_concurrent(ctx: ScenarioContext) -> list[dict]:
    """One client per model, all at once, single frames."""
    ids = _per_model(ctx)
    queues = [[single(m, i) for i in ids[m]] for m in ctx.models]
    tally = ctx.drive(queues, f"{len(ctx.models)} models, concurrent")
    return [tally.row("multi-concurrent", f"{len(ctx.models)} models, concurrent", clients=len(ctx.models),
                      batch=1, models=len(ctx.models))]


def multi_mixed(ctx: ScenarioContext) -> list[dict]:
    """``clients`` clients at once; each request a random model's single frame or a 5-item batch whose
    items are frames of random models (seeded, so runs plan the same traffic)."""
    rng = np.random.default_rng(ctx.seed)
    jobs: list[Job] = []
    planned = 0
    while planned < ctx.frames:
        if rng.random() < 0.5:
            model = ctx.models[rng.integers(len(ctx.models))]
            jobs.append(single(model, ctx.ids.take(model, 1)[0]))
            planned += 1
        else:
            picks = [ctx.models[k] for k in rng.integers(len(ctx.models), size=MIXED_BATCH)]
            jobs.append(batch([(m, ctx.ids.take(m, 1)[0]) for m in picks]))
            planned += MIXED_BATCH
    tally = ctx.drive(split_round_robin(jobs, ctx.clients), f"{len(ctx.models)} models, mixed")
    return [tally.row("multi-mixed", f"{len(ctx.models)} models, mixed", clients=ctx.clients, batch="1 or 5",
                      models=len(ctx.models))]


def stress(ctx: ScenarioContext) -> list[dict]:
    """``clients`` clients sending single frames back to back until each run's frame count is done;
    the figure that matters is the success rate."""
    rows = []
    for n in ctx.stress_sizes:
        ids = ctx.ids.take(ctx.model, n)
        tally = ctx.drive(split_round_robin([single(ctx.model, i) for i in ids], ctx.clients), f"stress {n}")
        rows.append(tally.row("stress", f"stress, {n} frames", clients=ctx.clients, batch=1, stress_frames=n))
    return rows


def cache_hit(ctx: ScenarioContext) -> list[dict]:
    """One client asks for a new frame, then for the same frame again: the second answer's latency is the
    cache hit's (the first's is reported beside it)."""
    ids = ctx.ids.take(ctx.model, ctx.cache_pairs)
    first, second = Tally(planned_frames=len(ids)), Tally(planned_frames=len(ids))
    hit_time = 0.0
    with connect(ctx.target, ctx.api_key, ctx.timeout_s) as client:
        deadline = time.perf_counter() + ctx.max_seconds
        first.start()
        second.start()
        for frame_id in tqdm(ids, desc="cache hits", unit="pair", disable=not ctx.progress, leave=False):
            if time.perf_counter() >= deadline:
                break
            first.record(1, *_timed(client, single(ctx.model, frame_id)))
            ok, cached, errors, latency = _timed(client, single(ctx.model, frame_id))
            second.record(1, ok, cached, errors, latency)
            hit_time += latency
    row = second.row("cache", "cache hit (same frame again)", clients=1, batch=1,
                     first_request_p50_ms=latency_summary(first.latencies)["p50_ms"],
                     first_request_cache_hits=first.cache_hits,
                     hit_rate=second.cache_hits / second.ok_frames if second.ok_frames else None)
    row["fps"] = second.ok_frames / hit_time if hit_time > 0 else None  # back-to-back hits, misses left out
    return [row]


def outputs(ctx: ScenarioContext) -> list[dict]:
    """The prediction region, then full frames: ``clients`` clients sending batches of OUTPUTS_BATCH, with
    the pod's CPU time per frame. First one full frame of every template, untimed: a pod that has served a
    model for a while keeps each template's JPEG for splicing, and that steady state is what is measured."""
    warm = warmup_frames(ctx.templates.get(ctx.model, 0))
    if warm:
        ids = ctx.ids.take(ctx.model, warm)
        jobs = [batch([(ctx.model, i) for i in ids[s : s + OUTPUTS_BATCH]]) for s in range(0, warm, OUTPUTS_BATCH)]
        ctx.drive(split_round_robin(jobs, ctx.clients), "outputs warm-up")
    rows = []
    for region, label in (("prediction", "prediction region (320x320)"), ("full", "full frames")):
        ids = ctx.ids.take(ctx.model, ctx.frames)
        jobs = [batch([(ctx.model, i) for i in ids[s : s + OUTPUTS_BATCH]], region=region)
                for s in range(0, len(ids), OUTPUTS_BATCH)]
        cpu0 = ctx.pod_cpu_seconds()
        tally = ctx.drive(split_round_robin(jobs, ctx.clients), label)
        cpu1 = ctx.pod_cpu_seconds()
        cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None and tally.ok_frames else None
        rows.append(tally.row(f"outputs-{region}", f"{label}, {ctx.clients} clients", clients=ctx.clients,
                              batch=OUTPUTS_BATCH, output_region=region,
                              pod_cpu_ms_per_frame=1000 * cpu / tally.ok_frames if cpu else None,
                              fps_per_pod_core=tally.ok_frames / cpu if cpu else None))
    if rows[0]["fps"] and rows[1]["fps"]:
        rows[1]["fps_vs_region"] = rows[1]["fps"] / rows[0]["fps"]
    return rows


def warmup_frames(templates: int) -> int:
    """Consecutive frames that use every template once at least: one period of the ping-pong walk."""
    return min(OUTPUTS_WARMUP_MAX, max(1, 2 * (templates - 1)))


def _timed(client, job: Job) -> tuple[int, int, list[str], float]:
    started = time.perf_counter()
    ok, cached, errors = execute(client, job)
    return ok, cached, errors, time.perf_counter() - started


SCENARIOS: dict[str, Callable[[ScenarioContext], list[dict]]] = {
    "sequential": sequential,
    "batch5": batches(5),
    "batch50": batches(50),
    "concurrent": concurrent,
    "multi-sequential": multi_sequential,
    "multi-concurrent": multi_concurrent,
    "multi-mixed": multi_mixed,
    "stress": stress,
    "cache": cache_hit,
    "outputs": outputs,
}


def frames_needed(name: str, ctx_frames: int, n_models: int, stress_sizes, cache_pairs: int) -> tuple[int, int]:
    """Upper bound of the frame ids a scenario takes: (of models[0], of each other model)."""
    per_model = max(1, ctx_frames // n_models)
    return {
        "sequential": (ctx_frames, 0),
        "batch5": (math.ceil(ctx_frames / 5) * 5, 0),
        "batch50": (math.ceil(ctx_frames / 50) * 50, 0),
        "concurrent": (ctx_frames, 0),
        "multi-sequential": (per_model, per_model),
        "multi-concurrent": (per_model, per_model),
        "multi-mixed": (ctx_frames + MIXED_BATCH, ctx_frames + MIXED_BATCH),  # random models: any may get all
        "stress": (sum(stress_sizes), 0),
        "cache": (cache_pairs, 0),
        "outputs": (2 * ctx_frames + warmup_frames(DEMO_TEMPLATES), 0),
    }.get(name, (0, 0))
