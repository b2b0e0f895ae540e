"""``lipsync bench engine``: batched engine throughput against SyncTalk_2D's per-frame loop, in one run.

Both sides get the same package, the same audio features and the same device; the naive loop reads
its templates from disk per frame as SyncTalk_2D does, the engine uses its resident templates. Ratios
within one run are what the README quotes, so machine load affects both sides alike.

It also puts the two outputs side by side at the run's frame size: the 320x320 prediction region and the
full frame, each as the JPEG a request gets, with the process's CPU time per frame. With
``identity_network`` the U-Net is replaced by the benchmark-only identity (the naive loop is then left
out), which leaves what the CPU side costs: the ceiling a pod reaches once its network runs at GPU speed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference_pod.bench import naive
from inference_pod.bench.report import latency_summary, machine_info, markdown_table, write_json
from inference_pod.core.encoding import DEFAULT_JPEG_QUALITY, OutputSpec, encode_image, frame_pool
from inference_pod.core.engine import Engine
from inference_pod.core.templates import TEMPLATE_STORAGES

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class EngineBenchConfig:
    package: Path | None = None  # None: a demo character of `width` is generated
    width: int = 32
    frame_size: tuple[int, int] = (256, 256)  # of the generated demo
    identity_network: bool = False  # benchmark-only identity instead of the U-Net
    output_batch: int = 16  # batch of the region-vs-full rows
    device: str = "cpu"
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    frames: int = 64  # frames per batch-size run
    naive_frames: int = 16
    warmup_batches: int = 1
    composite_workers: int = 4
    template_storages: tuple[str, ...] = TEMPLATE_STORAGES  # compared at the largest batch size; the first runs the rest
    storage_rounds: int = 3  # turns each storage takes, alternating order
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


def _bench_batched(engine: Engine, features: np.ndarray, batch: int, cfg: EngineBenchConfig,
                   pool: Executor) -> dict[str, Any]:
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
    futures: list[Future[np.ndarray]] = []
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


def _gather_seconds(engine: Engine, features: np.ndarray, batch: int, cfg: EngineBenchConfig) -> list[float]:
    n_tracks = len(features)
    times: list[float] = []
    for start in range(-batch, max(cfg.frames, batch), batch):  # the first batch is a warm-up
        first = max(start, 0)
        templates = [engine.template_index(i % n_tracks) for i in range(first, first + batch)]
        t0 = time.perf_counter()
        engine.gather(templates)
        _sync(cfg.device)
        if start >= 0:
            times.append(time.perf_counter() - t0)
    return times


def _bench_storages(package, features: np.ndarray, cfg: EngineBenchConfig, pool: Executor) -> list[dict[str, Any]]:
    """Each template storage at the largest batch size: what it holds where once loaded, what a batch's
    gather costs (host: copies into the staging buffer; compressed: PNG decodes; device: the indices only,
    its gather runs on the device inside the step), and frames/s end to end. The storages take turns, in
    alternating order, ``storage_rounds`` times, and each reports its medians: a busy machine slows them
    alike."""
    batch = max(cfg.batch_sizes)
    engines = {storage: Engine.from_package(package, device=cfg.device, precision=cfg.precision, max_batch=batch,
                                            identity_network=cfg.identity_network, template_storage=storage)
               for storage in cfg.template_storages}
    use = {storage: engine.memory_use() for storage, engine in engines.items()}
    gather: dict[str, list[float]] = {storage: [] for storage in engines}
    fps: dict[str, list[float]] = {storage: [] for storage in engines}
    try:
        for round_ in range(cfg.storage_rounds):
            for storage in (cfg.template_storages if round_ % 2 == 0 else cfg.template_storages[::-1]):
                gather[storage] += _gather_seconds(engines[storage], features, batch, cfg)
                fps[storage].append(_bench_batched(engines[storage], features, batch, cfg, pool)["end_to_end_fps"])
    finally:
        for engine in engines.values():
            engine.close()
    rows = []
    for storage, engine in engines.items():
        rows.append({
            "template_storage": storage, "batch": batch, "templates": engine.num_templates,
            "rounds": cfg.storage_rounds, "device_bytes": use[storage].device, "host_bytes": use[storage].host,
            "mapped_bytes": use[storage].mapped, "mapped_mb": use[storage].mapped / 1e6,  # prepared, page cache
            "template_bytes": use[storage].templates, "template_kb_each": use[storage].templates / engine.num_templates / 1000,
            "device_mb": use[storage].device / 1e6, "host_mb": use[storage].host / 1e6,
            "gather_ms": 1000 * float(np.median(gather[storage])),
            "gather_p95_ms": 1000 * float(np.percentile(gather[storage], 95)),
            "end_to_end_fps": float(np.median(fps[storage])), "end_to_end_fps_rounds": fps[storage]})
    return rows


def _prediction_jpeg(engine: Engine, template: int, prediction: np.ndarray) -> bytes:
    return encode_image(prediction, OutputSpec(region="prediction"))


def _full_jpeg(engine: Engine, template: int, prediction: np.ndarray) -> bytes:
    return engine.full_frame_jpeg(template, prediction, DEFAULT_JPEG_QUALITY).data


def _full_jpeg_whole(engine: Engine, template: int, prediction: np.ndarray) -> bytes:
    return encode_image(engine.composite(template, prediction), OutputSpec())  # the same bytes, never spliced


OUTPUTS: dict[str, Callable[[Engine, int, np.ndarray], bytes]] = {
    "prediction region": _prediction_jpeg, "full frame": _full_jpeg, "full frame, whole-frame encode": _full_jpeg_whole}


def _bench_outputs(engine: Engine, features: np.ndarray, cfg: EngineBenchConfig,
                   pool: Executor) -> list[dict[str, Any]]:
    """Each output as a request gets it (default JPEG), batches predicted then encoded in the pool, overlapped
    as in the pod. Every template's first full frame (its encoding is kept for splicing) is made before the
    clock starts: the steady state of a pod that has served the model a while. Any prediction will do for
    that (outside the crop box a frame is its template), so the template's own region stands in for one."""
    for t in range(engine.num_templates):
        _full_jpeg(engine, t, engine.template_crop(t))
    n_tracks = len(features)
    ids = [i % n_tracks for i in range(max(cfg.frames, cfg.output_batch))]
    rows: list[dict[str, Any]] = []
    for label, encode in OUTPUTS.items():
        warm = ids[: cfg.output_batch]  # untimed: the pool's threads and buffers, as for the other rows
        chosen = [engine.template_index(i) for i in warm]
        for f in [pool.submit(encode, engine, t, p) for t, p in
                  zip(chosen, engine.predict(chosen, engine.windows(features, warm)), strict=True)]:
            f.result()
        cpu0, t0 = time.process_time(), time.perf_counter()
        futures: list[Future[bytes]] = []
        for start in range(0, len(ids), cfg.output_batch):
            chunk = ids[start : start + cfg.output_batch]
            chosen = [engine.template_index(i) for i in chunk]
            predictions = engine.predict(chosen, engine.windows(features, chunk))
            futures.extend(pool.submit(encode, engine, t, p) for t, p in zip(chosen, predictions, strict=True))
        size = sum(len(f.result()) for f in futures)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows.append({"output": label, "frames": len(ids), "fps": len(ids) / wall,
                     "cpu_ms_per_frame": 1000 * cpu / len(ids), "fps_per_core": len(ids) / cpu if cpu else None,
                     "kb_per_frame": size / len(ids) / 1000})
    for row in rows[1:]:
        row["fps_vs_region"] = row["fps"] / rows[0]["fps"]
    return rows


def run(cfg: EngineBenchConfig, log=print) -> dict:
    from inference_pod.package import open_package

    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        workdir = Path(tmp)
        source = cfg.package
        if source is None:
            from inference_pod.tools.demo_character import build_demo_package

            source = workdir / "bench-demo.zip"
            build_demo_package("bench-demo", source, width=cfg.width, seed=cfg.seed, size=cfg.frame_size)
        package = open_package(source)
        engine = Engine.from_package(package, device=cfg.device, precision=cfg.precision, max_batch=max(cfg.batch_sizes),
                                     identity_network=cfg.identity_network, template_storage=cfg.template_storages[0])
        features = engine.default_features
        if features is None:
            features = np.random.default_rng(cfg.seed).standard_normal((cfg.frames + 16, 512)).astype(np.float32)
        baseline = None
        if cfg.identity_network:
            log("BENCHMARK IDENTITY NETWORK: no U-Net runs; the naive loop is left out")
        elif cfg.naive_frames > 0:
            log(f"naive SyncTalk_2D loop, {cfg.naive_frames} frames ...")
            baseline = _bench_naive(package, engine, features, cfg, workdir)
            log(f"  {baseline['fps']:.2f} frames/s")
        rows: list[dict[str, Any]] = []
        with frame_pool(cfg.composite_workers, "bench-frames") as pool:
            for batch in cfg.batch_sizes:
                row = _bench_batched(engine, features, batch, cfg, pool)
                row["speedup_end_to_end"] = row["end_to_end_fps"] / baseline["fps"] if baseline else None
                rows.append(row)
                log(f"  batch {batch:3d}: model {row['model_fps']:8.1f} fps, end to end {row['end_to_end_fps']:8.1f} fps")
            outputs = _bench_outputs(engine, features, cfg, pool)
            engine.close()
            storages = _bench_storages(package, features, cfg, pool)
            for row in storages:
                log(f"  templates {row['template_storage']:<10}: device {row['device_mb']:8.1f} MB, host {row['host_mb']:8.1f} MB, "
                    f"gather {row['gather_ms']:.2f} ms a batch, end to end {row['end_to_end_fps']:8.1f} fps")
        for row in storages[1:]:
            row["fps_vs_first"] = row["end_to_end_fps"] / storages[0]["end_to_end_fps"]
        for row in outputs:
            log(f"  {row['output']:<17}: {row['fps']:8.1f} fps, {row['cpu_ms_per_frame']:.2f} ms CPU a frame "
                f"({row['fps_per_core']:.0f} frames/s per core)")
        result: dict[str, Any] = {
            "benchmark": "engine",
            "machine": machine_info(cfg.device),
            "identity_network": cfg.identity_network,
            "config": {"package": package.manifest.name, "model_width": package.manifest.model_width,
                       "templates": engine.num_templates, "image_size": list(package.manifest.image_size),
                       "precision": cfg.precision, "frames_per_run": cfg.frames,
                       "template_storage": cfg.template_storages[0],
                       "identity_network": cfg.identity_network, **cfg.extra},
            "naive_loop": baseline,
            "batched": rows,
            "outputs": outputs,
            "template_storages": storages,
        }
    naive_row = [{"batch": "naive loop", "model_fps": None, "end_to_end_fps": baseline["fps"],
                  "batch_p50_ms": baseline["p50_ms"], "speedup_end_to_end": 1.0}] if baseline else []
    width, height = result["config"]["image_size"]
    title = f"{width}x{height} frames, model width {result['config']['model_width']}" + (
        ", BENCHMARK IDENTITY NETWORK (no U-Net)" if cfg.identity_network else "")
    result["markdown"] = title + "\n\n" + markdown_table(
        naive_row + rows,
        [("batch", "batch"), ("model_fps", "model FPS"), ("end_to_end_fps", "end-to-end FPS"),
         ("batch_p50_ms", "batch p50 ms"), ("batch_p95_ms", "batch p95 ms"), ("speedup_end_to_end", "x naive")],
    ) + "\n\n" + markdown_table(outputs, [
        ("output", f"output (JPEG q{DEFAULT_JPEG_QUALITY}, batch {cfg.output_batch})"), ("fps", "frames/s"),
        ("fps_vs_region", "vs region"), ("cpu_ms_per_frame", "CPU ms a frame"),
        ("fps_per_core", "frames/s per core"), ("kb_per_frame", "kB a frame")]) + "\n\n" + markdown_table(storages, [
        ("template_storage", f"templates ({result['config']['templates']}), batch {max(cfg.batch_sizes)}"),
        ("device_mb", "device MB"), ("host_mb", "host MB"), ("template_kb_each", "kB a template"),
        ("gather_ms", "gather ms a batch (p50)"), ("end_to_end_fps", "end-to-end FPS"),
        ("fps_vs_first", f"vs {cfg.template_storages[0]}")])
    if cfg.out is not None:
        write_json(cfg.out, result)
    return result
