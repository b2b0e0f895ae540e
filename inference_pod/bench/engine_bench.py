"""``lipsync bench engine``: batched engine throughput against SyncTalk_2D's per-frame loop, in one run.

Both sides get the same package, the same audio features and the same device; the naive loop reads
its templates from disk per frame as SyncTalk_2D does, the engine uses its resident templates. Ratios
within one run are what the README quotes, so machine load affects both sides alike.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference_pod.bench import naive
from inference_pod.bench.report import latency_summary, machine_info, markdown_table, write_json
from inference_pod.engine import Engine

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class EngineBenchConfig:
    package: Path | None = None  # None: a demo character of `width` is generated
    width: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    frames: int = 64  # frames per batch-size run
    naive_frames: int = 16
    warmup_batches: int = 1
    composite_workers: int = 4
    seed: int = 0
    out: Path | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bench_naive(package, engine: Engine, features: np.ndarray, cfg: EngineBenchConfig, workdir: Path) -> dict:
    dataset = naive.write_dataset_layout(package, workdir / "synctalk_layout")
    net = naive.load_network(package.unet_state(), engine.mode, package.manifest.model_width, cfg.device)
    frames = cfg.naive_frames + 1
    times: list[float] = []
    start = time.perf_counter()
    for _ in naive.run_loop(dataset, net, features, cfg.device, limit=frames):
        _sync(cfg.device)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    times = times[1:]  # the first frame pays one-off costs (allocator, kernels)
    return {"frames": len(times), "fps": len(times) / sum(times), **latency_summary(times)}


def _bench_batched(engine: Engine, features: np.ndarray, batch: int, cfg: EngineBenchConfig, pool) -> dict:
    n = max(cfg.frames, batch)
    n_tracks = len(features)
    ids = [i % n_tracks for i in range(n + cfg.warmup_batches * batch)]
    batches = [ids[s : s + batch] for s in range(0, len(ids), batch)]
    for warm in batches[: cfg.warmup_batches]:
        engine.predict([engine.template_index(i) for i in warm], engine.windows(features, warm))
    _sync(cfg.device)

    # Model only: windows -> predictions on the host, one batch after another.
    model_latency: list[float] = []
    t0 = time.perf_counter()
    for chunk in batches[cfg.warmup_batches :]:
        s = time.perf_counter()
        engine.predict([engine.template_index(i) for i in chunk], engine.windows(features, chunk))
        model_latency.append(time.perf_counter() - s)
    model_time = time.perf_counter() - t0

    # End to end: the same, plus compositing every frame into its full template, overlapped in a pool.
    t0 = time.perf_counter()
    futures = []
    for chunk in batches[cfg.warmup_batches :]:
        templates = [engine.template_index(i) for i in chunk]
        preds = engine.predict(templates, engine.windows(features, chunk))
        futures.extend(pool.submit(engine.composite, t, p) for t, p in zip(templates, preds, strict=True))
    for f in futures:
        f.result()
    e2e_time = time.perf_counter() - t0

    frames = len(ids) - cfg.warmup_batches * batch
    return {
        "batch": batch,
        "frames": frames,
        "model_fps": frames / model_time,
        "end_to_end_fps": frames / e2e_time,
        **{f"batch_{k}": v for k, v in latency_summary(model_latency).items()},
    }


def run(cfg: EngineBenchConfig, log=print) -> dict:
    from inference_pod.package import open_package

    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        workdir = Path(tmp)
        source = cfg.package
        if source is None:
            from inference_pod.demo_character import build_demo_package

            source = workdir / "bench-demo.zip"
            build_demo_package("bench-demo", source, width=cfg.width, seed=cfg.seed)
        package = open_package(source)
        engine = Engine.from_package(package, device=cfg.device, precision=cfg.precision, max_batch=max(cfg.batch_sizes))
        features = engine.default_features
        if features is None:
            features = np.random.default_rng(cfg.seed).standard_normal((cfg.frames + 16, 512)).astype(np.float32)
        log(f"naive SyncTalk_2D loop, {cfg.naive_frames} frames ...")
        baseline = _bench_naive(package, engine, features, cfg, workdir)
        log(f"  {baseline['fps']:.2f} frames/s")
        rows = []
        with ThreadPoolExecutor(max_workers=cfg.composite_workers) as pool:
            for batch in cfg.batch_sizes:
                row = _bench_batched(engine, features, batch, cfg, pool)
                row["speedup_end_to_end"] = row["end_to_end_fps"] / baseline["fps"]
                rows.append(row)
                log(f"  batch {batch:3d}: model {row['model_fps']:8.1f} fps, end to end {row['end_to_end_fps']:8.1f} fps "
                    f"({row['speedup_end_to_end']:.1f}x naive)")
        result = {
            "benchmark": "engine",
            "machine": machine_info(cfg.device),
            "config": {"package": package.manifest.name, "model_width": package.manifest.model_width,
                       "templates": engine.num_templates, "image_size": list(package.manifest.image_size),
                       "precision": cfg.precision, "frames_per_run": cfg.frames, **cfg.extra},
            "naive_loop": baseline,
            "batched": rows,
        }
        engine.close()
    result["markdown"] = markdown_table(
        [{"batch": "naive loop", "model_fps": None, "end_to_end_fps": baseline["fps"], "batch_p50_ms": baseline["p50_ms"],
          "speedup_end_to_end": 1.0}] + rows,
        [("batch", "batch"), ("model_fps", "model FPS"), ("end_to_end_fps", "end-to-end FPS"),
         ("batch_p50_ms", "batch p50 ms"), ("batch_p95_ms", "batch p95 ms"), ("speedup_end_to_end", "x naive")],
    )
    if cfg.out is not None:
        write_json(cfg.out, result)
    return result
