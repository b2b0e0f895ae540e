"""The same frames without the service: the engine in this process, for the network/serialization ratio.

Per frame it does what the server's frame path does minus gRPC, protobuf, the batcher and the cache:
audio window, ``Engine.predict``, ``Engine.composite`` and the same JPEG encoding (the default output:
full frame, quality 90). Single frames are timed one by one, like the sequential scenario; batches are
one ``predict`` of the whole batch followed by compositing and encoding each frame, like a 50-frame
``GenerateBatch``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from inference_pod.bench.report import latency_summary
from inference_pod.core.encoding import OutputSpec
from inference_pod.core.engine import Engine

OUTPUT = OutputSpec()  # what a request without output options gets
WARMUP_FRAMES = 2


def _frames(engine: Engine, features, ids: Sequence[int]) -> list[bytes]:
    templates = [engine.template_index(i) for i in ids]
    predictions = engine.predict(templates, engine.windows(features, ids))
    return [engine.full_frame_jpeg(t, p, OUTPUT.jpeg_quality).data  # what the pipeline does for OUTPUT
            for t, p in zip(templates, predictions, strict=True)]


def _row(scenario: str, label: str, frames: int, latencies: list[float], wall: float, batch: int) -> dict:
    return {"scenario": scenario, "label": label, "requests": len(latencies), "planned_frames": frames,
            "sent_frames": frames, "ok_frames": frames, "fps": frames / wall if wall > 0 else None,
            "wall_s": round(wall, 3), **latency_summary(latencies), "success_rate": 1.0, "cache_hits": 0,
            "errors": {}, "cut_by_deadline": False, "clients": 1, "batch": batch}


def measure_engine(package_path: Path, runs: dict[str, tuple[list[int], int]], *, device: str = "cpu",
                   precision: str = "fp32", max_batch: int = 32, cache_dir: Path | None = None,
                   progress: bool = True) -> list[dict]:
    """``runs``: name -> (frame ids, batch size), e.g. the ids the sequential and batch50 scenarios used.
    Frames are only counted when every image encoded to non-empty bytes."""
    from inference_pod.package import open_package

    engine = Engine.from_package(open_package(package_path, cache_dir=cache_dir), device=device,
                                 precision=precision, max_batch=max_batch)
    try:
        features = engine.default_features
        if features is None:
            raise ValueError(f"{package_path} has no default track to compare with")
        rows = []
        for name, (ids, size) in runs.items():
            _frames(engine, features, ids[:WARMUP_FRAMES])  # first calls pay one-off allocations
            latencies: list[float] = []
            started = time.perf_counter()
            chunks = [ids[s : s + size] for s in range(0, len(ids), size)]
            for chunk in tqdm(chunks, desc=f"engine, {name}", unit="request", disable=not progress, leave=False):
                t = time.perf_counter()
                images = _frames(engine, features, chunk)
                latencies.append(time.perf_counter() - t)
                if len(images) != len(chunk) or not all(images):
                    raise RuntimeError("the engine returned an empty image")
            wall = time.perf_counter() - started
            label = "in-process engine, single frames" if size == 1 else f"in-process engine, {size}-frame batches"
            rows.append(_row(f"engine-{name}", label, len(ids), latencies, wall, size))
        return rows
    finally:
        engine.close()
