"""``lipsync bench load``: how long a character takes from a load to its first frame, and what memory its
templates take, per frame size and template count (synthetic characters made here, removed after).

Each configuration, each step in a fresh process (a cold interpreter, as a new pod or a reload):

- ``zip``: a package zip -> extracted into a store, templates prepared, engine built, first frame served;
- ``store``: the same from the prepared store (what every later load on the node does), while the ``zip``
  process still holds the character: the second process's private and shared memory, from
  ``/proc/PID/smaps_rollup`` and its mapping of the crops (``/proc/PID/smaps``);
- ``pod``: a running ``lipsync serve`` over that store: ``LoadModel``, then its first frame (``GenerateFrame``,
  a full frame), timed by the client over gRPC: what a user of a pod sees;
- ``store`` again for each other template storage (memory by storage mode);
- ``derived`` (``--derived``): from the store with preparation off, every template decoded and derived in
  the load, as every load did before prepared templates;
- ``decode``: the bare decode of the template JPEGs on one thread, in this process: the floor a load that
  derives cannot beat.

Frames are cycled from a small drawn demo character (``--distinct`` frames), so a 7,500-template 1080p
character takes minutes to build rather than an hour; decoding, preparing and mapping cost the same per
template whatever the pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference_pod.bench.report import machine_info

CHILD = """
import json, sys
from inference_pod.bench.load_bench import serve_first_frame
print(json.dumps(serve_first_frame(**json.loads(sys.argv[1]))), flush=True)
sys.stdin.read()  # held (and resident) until the bench has read /proc
"""


@dataclass
class LoadBenchConfig:
    sizes: Sequence[tuple[int, int]] = ((256, 256), (1280, 720), (1920, 1080))
    templates: Sequence[int] = (1500, 7500)
    storages: Sequence[str] = ("host",)
    derived: bool = False
    distinct: int = 25
    width: int = 4
    work_dir: Path | None = None
    out: Path = Path("bench-results/load.json")
    progress: bool = True
    results: list[dict[str, Any]] = field(default_factory=list)


_held: list[Any] = []  # the child's engine, kept (and its templates mapped) while the bench reads /proc


def serve_first_frame(package: str, store: str, from_zip: bool, storage: str, prepared: bool) -> dict[str, Any]:
    """In a fresh process: the load and the first frame, then every template's crop read once (a pod that
    has played the loop); returns the timings."""
    started = time.perf_counter()
    import numpy as np

    from inference_pod.core.engine import Engine
    from inference_pod.package import extract_package, open_package, read_manifest
    from inference_pod.serving.model_store import store_copy

    imported = time.perf_counter()
    if from_zip:
        pkg = extract_package(package, store_copy(Path(store), read_manifest(package)))
    else:
        pkg = open_package(package)
    opened = time.perf_counter()
    engine = Engine.from_package(pkg, max_batch=8, template_storage=storage, prepared_templates=prepared)
    built = time.perf_counter()
    prediction = engine.predict([1], np.zeros((1, *engine.audio_shape), np.float32))
    engine.full_frame_jpeg(1, prediction[0], 85)
    first = time.perf_counter()
    for start in range(0, engine.num_templates, 8):  # the whole loop played once: every crop resident
        ids = list(range(start, min(engine.num_templates, start + 8)))
        if storage == "host":
            engine.gather(ids)
        else:
            for t in ids:
                engine.templates.crop(t)
    use = engine.memory_use()
    _held.append(engine)
    return {"import_s": imported - started, "open_s": opened - imported, "engine_s": built - opened,
            "first_frame_s": first - imported, "private_bytes": use.total, "mapped_bytes": use.mapped,
            "prepared": engine.templates.prepared.mapped}


def proc_memory(pid: int, crops: Path | None) -> dict[str, int]:
    """Resident bytes of a process (smaps_rollup) and of its mapping of the crops file (smaps)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    result = {"rss": out["Rss"], "pss": out["Pss"], "private": out["Private_Clean"] + out["Private_Dirty"],
              "shared": out["Shared_Clean"] + out["Shared_Dirty"]}
    if crops is not None:
        fields: dict[str, int] = {}
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            parts = line.split()
            if parts and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and parts[-1] == str(crops)
            elif inside and line.endswith(" kB"):
                fields[parts[0].rstrip(":")] = fields.get(parts[0].rstrip(":"), 0) + int(parts[1]) * 1024
        result.update(crops_rss=fields.get("Rss", 0), crops_pss=fields.get("Pss", 0),
                      crops_private=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))
    return result


class _Child:
    def __init__(self, **kwargs: Any):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(kwargs)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench load: the load process failed ({kwargs})")
        self.result: dict[str, Any] = json.loads(line)

    def memory(self, crops: Path | None) -> dict[str, int]:
        return proc_memory(self.proc.pid, crops)

    def close(self) -> None:
        self.proc.communicate("", timeout=120)


class _Cycle(Sequence[bytes]):
    """``count`` frames cycled from a few: a long character without holding its frames."""

    def __init__(self, frames: list[bytes], count: int):
        self._frames, self._count = frames, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return self._frames[index % len(self._frames)]


def synthetic_package(work: Path, size: tuple[int, int], count: int, distinct: int, width: int) -> Path:
    """A character of ``count`` templates at ``size``, its frames cycled from a drawn demo's ``distinct``."""
    import numpy as np

    from inference_pod.package import extract_package, write_package
    from inference_pod.tools.demo_character import build_demo_package

    base_zip = work / "base.zip"
    build_demo_package("base", base_zip, width=width, frames=min(distinct, count), size=size, audio_seconds=1.0)
    base = extract_package(base_zip, work / "base")
    m = base.manifest
    frames = [base.frame_bytes(i) for i in range(m.frame_count)]
    boxes = np.asarray(base.crop_boxes())
    name = f"load-{size[0]}x{size[1]}-{count}"
    out = work / f"{name}.zip"
    write_package(out, name=name, version="1", audio_mode=m.audio_mode, model_width=m.model_width, fps=m.fps,
                  frames=_Cycle(frames, count), frame_ext=m.frame_member(0).rsplit(".", 1)[1],
                  crop_boxes=boxes[np.arange(count) % len(boxes)], unet_state=base.unet_state(),
                  audio_encoder_state=base.audio_encoder_state(), default_features=base.default_features(),
                  default_audio=(base.default_audio_path() or Path("/nonexistent")).read_bytes()
                  if base.default_audio_path() else None)
    shutil.rmtree(work / "base")
    base_zip.unlink()
    return out


def pod_first_frame(store: Path, copy: Path, storage: str, work: Path) -> dict[str, Any]:
    """``lipsync serve --models-dir store`` (nothing preloaded): LoadModel of the prepared copy, then one
    full frame, each timed from the client's side."""
    from inference_pod.bench.bench_server import BenchServer
    from inference_pod.client import LipSyncClient
    from inference_pod.package import read_manifest

    name = read_manifest(copy).name
    with BenchServer(store, [], log_path=work / "pod.log", extra_args=("--template-storage", storage)) as server, \
            LipSyncClient(server.target, timeout=600.0) as client:
        started = time.perf_counter()
        loaded = client.load_model(name)
        load_s = time.perf_counter() - started
        client.generate_frame(name, 1)
        first_s = time.perf_counter() - started
    return {"load_s": load_s, "first_frame_s": first_s, "source": loaded.source, "server_load_ms": loaded.load_ms}


def bare_decode_s(package: Path, count: int) -> float:
    """Every template JPEG decoded once, one after the other, from the extracted copy."""
    from inference_pod.core.prepared_templates import decode_template
    from inference_pod.package import open_package

    pkg = open_package(package)
    started = time.perf_counter()
    for i in range(count):
        decode_template(pkg.frame_bytes(i), i)
    return time.perf_counter() - started


def run_one(cfg: LoadBenchConfig, size: tuple[int, int], count: int, work: Path) -> dict[str, Any]:
    from inference_pod.core.prepared_templates import CROPS, prepared_dir

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if cfg.progress else (lambda text: None)
    row: dict[str, Any] = {"size": f"{size[0]}x{size[1]}", "templates": count}
    say(f"bench load {row['size']} x {count}: building the synthetic character")
    zip_path = synthetic_package(work, size, count, cfg.distinct, cfg.width)
    row["zip_bytes"] = zip_path.stat().st_size
    store = work / "store"
    main = cfg.storages[0]
    say("  zip -> first frame (extract, prepare)")
    first = _Child(package=str(zip_path), store=str(store), from_zip=True, storage=main, prepared=True)
    try:
        copy = next(p for p in store.iterdir() if not p.name.startswith("."))
        crops = (prepared_dir(copy) / CROPS).resolve()
        row["prepared_bytes"] = sum(p.stat().st_size for p in prepared_dir(copy).iterdir())
        row["zip"] = {**first.result, "memory": first.memory(crops)}
        say("  prepared store -> first frame, while the first process holds the character")
        second = _Child(package=str(copy), store=str(store), from_zip=False, storage=main, prepared=True)
        try:
            row["store"] = {**second.result, "memory": second.memory(crops), "first_memory": first.memory(crops)}
        finally:
            second.close()
    finally:
        first.close()
    say("  a running pod over the prepared store: LoadModel, then the first frame over gRPC")
    row["pod"] = pod_first_frame(store, copy, main, work)
    row["storages"] = {}
    for storage in cfg.storages[1:]:
        # The node's first compressed load encodes the crops' PNGs into the prepared directory; later ones map them.
        labels = [f"{storage}, first on the node (writes the PNGs)", storage] if storage == "compressed" else [storage]
        for label in labels:
            say(f"  prepared store -> first frame, {label} storage")
            child = _Child(package=str(copy), store=str(store), from_zip=False, storage=storage, prepared=True)
            try:
                row["storages"][label] = {**child.result, "memory": child.memory(crops)}
            finally:
                child.close()
    if cfg.derived:
        say("  store -> first frame, every template derived in the load (no prepared templates)")
        child = _Child(package=str(copy), store=str(store), from_zip=False, storage=main, prepared=False)
        try:
            row["derived"] = {**child.result, "memory": child.memory(None)}
        finally:
            child.close()
    say("  bare decode of the template JPEGs, one thread")
    row["decode_s"] = bare_decode_s(copy, count)
    row["load_average"] = os.getloadavg()[0]
    shutil.rmtree(store, ignore_errors=True)
    zip_path.unlink()
    return row


def markdown(result: dict[str, Any]) -> str:
    mib = 2**20
    lines = [f"machine: {result['machine']['cpu']} ({result['machine']['cpu_count']} CPUs), "
             f"template storage {result['config']['storages'][0]} for the timings", "",
             "| character | zip -> first frame | prepared store: load / first frame | a pod: LoadModel / first frame "
             "| derived in the load: load / first frame | bare JPEG decode, 1 thread | 2nd process: private / crops "
             "private | its crops resident (PSS; 1st process's PSS) | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        store, first = row["store"]["memory"], row["store"]["first_memory"]
        derived = f"{_load_s(row['derived']):.2f} s / {row['derived']['first_frame_s']:.2f} s" if "derived" in row else "-"
        lines.append(
            f"| {row['size']} x {row['templates']} | {row['zip']['first_frame_s']:.2f} s "
            f"| {_load_s(row['store']):.2f} s / {row['store']['first_frame_s']:.2f} s "
            f"| {row['pod']['load_s']:.2f} s / {row['pod']['first_frame_s']:.2f} s | {derived} | {row['decode_s']:.2f} s "
            f"| {store['private'] / mib:.0f} MiB / {store['crops_private'] / mib:.1f} MiB "
            f"| {store['crops_rss'] / mib:.0f} MiB (PSS {store['crops_pss'] / mib:.0f}, first process "
            f"{first['crops_pss'] / mib:.0f}) | {row['load_average']:.1f} |")
    storages = [(row, s, v) for row in result["rows"] for s, v in row["storages"].items()]
    if storages:
        lines += ["", "| character | storage | store -> first frame | private | mapped (engine's count) |",
                  "|---|---|---:|---:|---:|"]
        for row, storage, value in storages:
            lines.append(f"| {row['size']} x {row['templates']} | {storage} | {value['first_frame_s']:.2f} s "
                         f"| {value['memory']['private'] / mib:.0f} MiB | {value['mapped_bytes'] / mib:.0f} MiB |")
    return "\n".join(lines)


def _load_s(step: dict[str, Any]) -> float:
    return float(step["open_s"] + step["engine_s"])


def run(cfg: LoadBenchConfig) -> dict[str, Any]:
    work_root = Path(tempfile.mkdtemp(prefix="lipsync-bench-load-", dir=cfg.work_dir))
    try:
        for size in cfg.sizes:
            for count in cfg.templates:
                cfg.results.append(run_one(cfg, size, count, work_root))
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("results", "out", "work_dir", "progress")}
    result: dict[str, Any] = {"machine": machine_info("cpu"), "config": config, "rows": cfg.results}
    result["markdown"] = markdown(result)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2))
    return result
