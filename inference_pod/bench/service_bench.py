"""``lipsync bench service``: the replaced service's scenarios, measured against a running pod over gRPC.

Against ``--target`` (a pod that is already running), or against a ``lipsync serve`` it starts itself with
demo packages. One run measures every scenario and the in-process engine on the same frames, so the
service's overhead is a ratio from the same run on the same machine. Writes service.json, service.md and
service.png. What each scenario means: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from inference_pod.bench import SERVICE_SCENARIOS
from inference_pod.bench import scenarios as sc
from inference_pod.bench.bench_server import BenchServer, build_demo_models, demo_model_names
from inference_pod.bench.inprocess import measure_engine
from inference_pod.bench.live_streams import live_streams
from inference_pod.bench.report import machine_info, markdown_table, write_json
from inference_pod.bench.request_driver import FrameIds, batch, connect, drive, single

# The replaced service's published figures (measured on its own GPU): what users compare us with.
REFERENCE: dict[str, dict[str, float] | list[float]] = {
    "sequential": {"fps": 36.0},
    "batch5": {"fps": 39.6},
    "batch50": {"fps": 53.6},
    "concurrent": {"fps": 84.2},
    "multi-concurrent": {"fps": 68.3},  # "68.3 FPS across 6 models"
    "stress": {"success_rate": 1.0},  # "100 % success over 1,000 frames"
    "overhead_pct": [5.0, 6.0],  # "5-6 % network overhead"
}
SCENARIOS = SERVICE_SCENARIOS
WARMUP_BATCH = 8
TRACK_MARGIN_FRAMES = 25  # demo tracks get this many frames more than the run asks for


@dataclass
class ServiceBenchConfig:
    target: str | None = None  # None: start a server with demo packages
    api_key: str | None = None
    package: Path | None = None  # the target's first model's package, for the in-process comparison
    models: int = 6
    width: int = 4  # U-Net base width of the demo models on CPU (32 = SyncTalk_2D's, the CUDA default)
    frame_size: tuple[int, int] = (256, 256)
    device: str = "cpu"
    precision: str = "fp32"
    frames: int = 100  # frames per scenario
    clients: int = 4
    streams: int = 4  # most concurrent live streams tried
    stream_seconds: float = 4.0
    chunk_ms: float = 40.0
    budget_ms: float = 200.0
    stress_sizes: tuple[int, ...] = (100, 1000)
    cache_pairs: int = 20
    scenarios: tuple[str, ...] = SCENARIOS
    torch_threads: int = 1  # per process; 0: torch's default
    server_args: tuple[str, ...] = ()  # more `lipsync serve` flags for the server it starts
    identity_network: bool = False  # the server it starts runs the benchmark-only identity, not the U-Net
    max_scenario_s: float = 300.0
    timeout_s: float = 60.0
    seed: int = 0
    out_dir: Path = Path("bench-results/service")
    progress: bool = True
    quick: bool = False

    @classmethod
    def preset(cls, quick: bool = False, **given) -> ServiceBenchConfig:
        """Defaults for a full run (or a quick one: every scenario, a few frames each); ``given`` values
        that are not None win. On CUDA: the full-width model, torch's own threads, and more live streams."""
        given = {k: v for k, v in given.items() if v is not None}
        values: dict[str, Any] = dict(QUICK) if quick else {}
        if given.get("device", "cpu").startswith("cuda"):
            values.update(width=32, torch_threads=0, streams=48)
        values.update(given)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        cfg = cls(quick=quick, **values)
        bad = [s for s in cfg.scenarios if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenarios {bad}; choose from {', '.join(SCENARIOS)}")
        if cfg.models < 1 or cfg.frames < 1 or cfg.clients < 1 or cfg.streams < 0:
            raise ValueError("--models, --frames and --clients must be >= 1, --streams >= 0")
        return cfg


QUICK = {"frame_size": (64, 64), "frames": 10, "clients": 2, "streams": 2, "stream_seconds": 1.5,
         "stress_sizes": (20, 50), "cache_pairs": 3, "max_scenario_s": 120.0}


def track_frames_needed(cfg: ServiceBenchConfig) -> tuple[int, int]:
    """Frames of default track the run can ask for: (first model, each other model)."""
    first, other = 1 + WARMUP_BATCH, 1
    for name in cfg.scenarios:
        a, b = sc.frames_needed(name, cfg.frames, cfg.models, cfg.stress_sizes, cfg.cache_pairs)
        first, other = first + a, other + b
    if "engine" in cfg.scenarios:  # its own frames when the scenarios it repeats are not run
        first += (0 if "sequential" in cfg.scenarios else cfg.frames) + (
            0 if "batch50" in cfg.scenarios else math.ceil(cfg.frames / 50) * 50)
    return first + TRACK_MARGIN_FRAMES, other + TRACK_MARGIN_FRAMES


def run(cfg: ServiceBenchConfig, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-service-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        package: Path | None
        if cfg.target is None:
            first, other = track_frames_needed(cfg)
            seconds = [(first if k == 0 else other) / 25 + 1 for k in range(cfg.models)]
            names = demo_model_names(cfg.models)
            log(f"building {cfg.models} demo packages (width {cfg.width}, {cfg.frame_size[0]}x{cfg.frame_size[1]}) ...")
            paths = build_demo_models(workdir / "models", cfg.models, width=cfg.width, frame_size=cfg.frame_size,
                                      audio_seconds=seconds, seed=cfg.seed, progress=cfg.progress)
            identity = ("--benchmark-identity-network",) if cfg.identity_network else ()
            log("starting lipsync serve on 127.0.0.1" + (" with the BENCHMARK IDENTITY NETWORK (no U-Net)"
                                                          if identity else "") + " ...")
            server = stack.enter_context(BenchServer(workdir / "models", names, log_path=workdir / "server.log",
                                                     device=cfg.device, precision=cfg.precision,
                                                     torch_threads=cfg.torch_threads,
                                                     extra_args=tuple(cfg.server_args) + identity))
            target, package, pod_cpu = server.target, paths[0], server.cpu_seconds
        else:
            target, package, names, pod_cpu = cfg.target, cfg.package, None, None
        result = _run_against(target, names, package, cfg, workdir, log, pod_cpu)
    result["markdown"] = render_markdown(result)
    out = cfg.out_dir
    result["files"] = {"json": str(out / "service.json"), "markdown": str(out / "service.md"),
                       "chart": str(out / "service.png")}
    from inference_pod.bench.chart import write_chart  # matplotlib: only when a chart is written

    out.mkdir(parents=True, exist_ok=True)
    (out / "service.md").write_text(result["markdown"] + "\n")
    write_chart(result, out / "service.png")
    write_json(out / "service.json", result)
    return result


def _models_and_tracks(target: str, names: list[str] | None,
                       cfg: ServiceBenchConfig) -> tuple[list[str], dict, dict, dict]:
    """Load the models (load time is not what is measured) and read their default tracks' lengths."""
    with connect(target, cfg.api_key, cfg.timeout_s) as client:
        if names is None:  # an existing pod: its first models by name, resident or not
            names = [m.name for m in client.list_models()][: cfg.models]
            if not names:
                raise RuntimeError(f"the server at {target} has no models")
        tracks, templates = {}, {}
        for name in names:
            info = client.load_model(name).model
            if info.default_track_frames <= 0:
                raise RuntimeError(f"model {name!r} has no default audio track to request frames of")
            tracks[name] = int(info.default_track_frames)
            templates[name] = int(info.frame_count)
        stats = client.get_stats()
    server = {"device": stats.device, "precision": stats.precision, "max_batch": stats.max_batch,
              "version": stats.server_version, "cache_backend": stats.cache.backend}
    return names, tracks, templates, server


def _warm_up(ctx: sc.ScenarioContext) -> None:
    """A frame of every model and a batch of the first, before anything is timed."""
    jobs = [single(m, ctx.ids.take(m, 1)[0]) for m in ctx.models]
    jobs.append(batch([(ctx.model, i) for i in ctx.ids.take(ctx.model, WARMUP_BATCH)]))
    tally = drive(ctx.target, [jobs], max_seconds=ctx.max_seconds, timeout_s=ctx.timeout_s, api_key=ctx.api_key,
                  progress=False)
    if tally.ok_frames != tally.planned_frames:
        raise RuntimeError(f"warm-up requests failed: {dict(tally.errors)}")


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_against(target: str, names: list[str] | None, package: Path | None, cfg: ServiceBenchConfig,
                 workdir: Path, log, pod_cpu_seconds=None) -> dict:
    names, tracks, templates, server = _models_and_tracks(target, names, cfg)
    ctx = sc.ScenarioContext(target=target, models=names, ids=FrameIds(tracks), frames=cfg.frames,
                             clients=cfg.clients, stress_sizes=cfg.stress_sizes, cache_pairs=cfg.cache_pairs,
                             max_seconds=cfg.max_scenario_s, timeout_s=cfg.timeout_s, api_key=cfg.api_key,
                             progress=cfg.progress, seed=cfg.seed, templates=templates,
                             pod_cpu_seconds=pod_cpu_seconds or (lambda: None))
    _warm_up(ctx)
    rows: list[dict] = []
    live: dict = {}
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    for name in SCENARIOS:
        if name not in cfg.scenarios:
            continue
        if name == "engine":
            if package is None:
                skipped[name] = "needs --package: the package of the target's first model"
                continue
            new = _engine_rows(ctx, package, server, cfg, workdir)
        elif name == "live":
            if cfg.streams < 1:
                skipped[name] = "--streams 0"
                continue
            levels, summary = live_streams(target, ctx.model, max_streams=cfg.streams, seconds=cfg.stream_seconds,
                                           chunk_ms=cfg.chunk_ms, budget_ms=cfg.budget_ms, seed=cfg.seed,
                                           api_key=cfg.api_key, progress=cfg.progress)
            live = {"levels": levels, **summary}
            log(f"  live streams: largest M without a missed deadline: {summary['largest_streams_without_miss']}"
                f" (levels {summary['levels_tried']})")
            continue
        else:
            new = sc.SCENARIOS[name](ctx)
        for row in new:
            ref = REFERENCE.get(row["scenario"])
            row["reference_fps"] = ref.get("fps") if isinstance(ref, dict) else None
            log(f"  {row['label']:<38} {_num(row['fps'], '.1f'):>8} FPS  p50 {_num(row['p50_ms'], '.1f')} ms  "
                f"success {_pct(row['success_rate'])}  cache hits {row['cache_hits']}")
        rows.extend(new)
    machine = machine_info(server["device"] or cfg.device)
    own = cfg.target is None
    label = _machine_label(machine, server) + (
        f", demo width {cfg.width}, {cfg.frame_size[0]}x{cfg.frame_size[1]}" if own else f", target {target}")
    if cfg.identity_network:
        label += ", BENCHMARK IDENTITY NETWORK (no U-Net)"
    return {
        "benchmark": "service",
        "label": label,
        "identity_network": cfg.identity_network,
        "machine": machine,
        "server": {**server, "target": target, "started_by_benchmark": own, "models": names,
                   "default_track_frames": tracks},
        "config": _config_dict(cfg),
        "reference": REFERENCE,
        "scenarios": rows,
        "live": live,
        "overhead": overhead(rows),
        "skipped": skipped,
        "tracks_wrapped": sorted(ctx.ids.wrapped),  # frames asked for twice: cache hits in generation rows
        "duration_s": round(time.perf_counter() - started, 1),
    }


def _engine_rows(ctx: sc.ScenarioContext, package: Path, server: dict, cfg: ServiceBenchConfig,
                 workdir: Path) -> list[dict]:
    """The in-process engine on the frames the sequential and 50-frame-batch scenarios asked for."""
    seq = ctx.frame_ids.get("sequential") or ctx.ids.take(ctx.model, cfg.frames)
    b50 = ctx.frame_ids.get("batch50") or ctx.ids.take(ctx.model, math.ceil(cfg.frames / 50) * 50)
    with _torch_threads(cfg.torch_threads):
        return measure_engine(package, {"sequential": (seq, 1), "batch50": (b50, 50)},
                              device=server["device"] or cfg.device, precision=server["precision"] or cfg.precision,
                              max_batch=server["max_batch"] or 32, cache_dir=workdir / "engine-packages",
                              progress=cfg.progress)


def overhead(rows: list[dict]) -> list[dict]:
    """The service against the in-process engine on the same frames: FPS ratio and the overhead share."""
    by = {r["scenario"]: r for r in rows}
    out = []
    for label, svc, eng in (("single frames", "sequential", "engine-sequential"),
                            ("50-frame batches", "batch50", "engine-batch50")):
        s, e = by.get(svc), by.get(eng)
        if not s or not e or not s.get("fps") or not e.get("fps"):
            continue
        out.append({"comparison": label, "service_fps": s["fps"], "engine_fps": e["fps"],
                    "fps_ratio": s["fps"] / e["fps"], "overhead_pct": 100.0 * (1.0 - s["fps"] / e["fps"]),
                    "service_p50_ms": s["p50_ms"], "engine_p50_ms": e["p50_ms"],
                    "latency_ratio": s["p50_ms"] / e["p50_ms"] if e["p50_ms"] else None})
    return out


def _config_dict(cfg: ServiceBenchConfig) -> dict:
    d = asdict(replace(cfg, api_key="***" if cfg.api_key else None))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _machine_label(machine: dict, server: dict) -> str:
    device = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} CPUs)"
    return f"{device}, {server['device'] or 'cpu'} {server['precision'] or 'fp32'}, torch {machine['torch']}"


# ------------------------------------------------------------------------------------------ report


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _reference_text(row: dict) -> str | None:
    if row["scenario"] == "stress":
        return "100 % success (1,000 frames)" if row.get("stress_frames", 0) >= 1000 else None
    if row.get("reference_fps"):
        return f"{row['reference_fps']:.1f} FPS"
    return None


def render_markdown(result: dict) -> str:
    parts = [f"**lipsync bench service**: {result['label']}", ""]
    table = [{**r, "frames": f"{r['ok_frames']}/{r['sent_frames']}", "success": _pct(r["success_rate"]),
              "reference": _reference_text(r)} for r in result["scenarios"]]
    if table:
        parts.append(markdown_table(table, [
            ("label", "scenario"), ("requests", "requests"), ("frames", "frames ok/sent"), ("fps", "FPS"),
            ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("success", "success"),
            ("cache_hits", "cache hits"), ("reference", "replaced service")]))
    outputs = [r for r in result["scenarios"] if r.get("output_region")]
    if outputs:
        parts += ["", "Prediction region against full frames (default JPEG q90) at the same load; pod CPU is the "
                      "server process's CPU seconds over the frames it returned", ""]
        parts.append(markdown_table(outputs, [
            ("label", "output"), ("fps", "FPS"), ("fps_vs_region", "vs region"), ("p50_ms", "p50 ms"),
            ("pod_cpu_ms_per_frame", "pod CPU ms a frame"), ("fps_per_pod_core", "FPS per pod core")]))
    live = result.get("live") or {}
    if live.get("levels"):
        parts += ["", f"Live audio streams, 25 fps each, {live['chunk_ms']:.0f} ms chunks at real time, "
                      f"{live['audio_seconds']:g} s each; deadline = the frame's audio window complete + "
                      f"{live['budget_ms']:.0f} ms. **Largest M with no missed deadline: "
                      f"{live['largest_streams_without_miss']}**", ""]
        rows = [{**r, "frames": f"{r['ok_frames']}/{r['planned_frames']}", "missed": _pct(r["miss_share"]),
                 "success": _pct(r["success_rate"])} for r in live["levels"]]
        parts.append(markdown_table(rows, [
            ("streams", "streams"), ("frames", "frames ok/expected"), ("fps", "FPS"), ("missed", "missed"),
            ("p50_ms", "p50 ms after window"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("success", "success")]))
    if result.get("overhead"):
        lo, hi = result["reference"]["overhead_pct"]
        parts += ["", f"Service against the in-process engine on the same frames (replaced service: "
                      f"{lo:g}-{hi:g} % network overhead)", ""]
        rows = [{**r, "overhead": f"{r['overhead_pct']:.1f} %"} for r in result["overhead"]]
        parts.append(markdown_table(rows, [
            ("comparison", "frames"), ("service_fps", "service FPS"), ("engine_fps", "in-process FPS"),
            ("fps_ratio", "service / in-process"), ("overhead", "overhead"), ("service_p50_ms", "service p50 ms"),
            ("engine_p50_ms", "in-process p50 ms")]))
    notes = []
    if result.get("tracks_wrapped"):
        notes.append(f"default tracks too short for the run, frames were asked for twice: "
                     f"{', '.join(result['tracks_wrapped'])} (see the cache-hit column)")
    notes += [f"{name} skipped: {why}" for name, why in result.get("skipped", {}).items()]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts)


__all__ = ["REFERENCE", "SCENARIOS", "ServiceBenchConfig", "overhead", "render_markdown", "run"]
