"""A store shared by the processes on a node (serving/node_store.py): leases on copies in use, garbage
collection of what no process uses, and two init containers racing to fetch and prepare the same package.
Real files, real processes holding real locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
from conditions import wait_until_async
from serving_support import models_dir_with, package

from inference_pod.core.engine import Engine
from inference_pod.core.prepared_templates import HEADER, prepared_dir
from inference_pod.package import extract_package, read_manifest
from inference_pod.serving.batcher import Batcher
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.model_store import ModelStore, store_copy
from inference_pod.serving.node_store import CopyLease, collect_garbage, lease_path
from inference_pod.serving.registry import file_url, publish

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOUR = 3600.0


def pod_store(models_dir: Path, store_dir: Path) -> ModelStore:
    """One pod's model store over a store directory the node's pods share; superseded copies go at once."""
    metrics = Metrics()
    return ModelStore(models_dir=models_dir, extract_dir=store_dir, metrics=metrics,
                      engine_factory=lambda pkg: Engine.from_package(pkg, max_batch=4),
                      batcher_factory=lambda name, engine: Batcher(name, engine, metrics, max_batch=4),
                      stale_after_s=0)


def extracted(store: Path, key: str) -> Path:
    zip_path = package(key)
    return extract_package(zip_path, store_copy(store, read_manifest(zip_path))).root


def age(path: Path, seconds: float) -> None:
    """Make ``path`` (and what is under it) look last written ``seconds`` ago."""
    when = time.time() - seconds
    for root, dirs, files in os.walk(path) if path.is_dir() else [(str(path.parent), [], [path.name])]:
        for name in (*dirs, *files):
            os.utime(os.path.join(root, name), (when, when))
    os.utime(path, (when, when))


class LeaseHolder:
    """Another process on the node holding a lease on a copy until it is killed."""

    def __init__(self, copy: Path):
        code = ("import sys; from pathlib import Path; from inference_pod.serving.node_store import CopyLease; "
                "CopyLease.take(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(copy)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.kill()  # no release: the kernel drops a dead process's locks
        self.proc.wait(timeout=30)


def test_a_superseded_copy_goes_only_when_no_process_leases_it_and_it_is_stale(tmp_path):
    store = tmp_path / "store"
    old, new = extracted(store, "demo-1"), extracted(store, "demo-2")
    other = extracted(store, "other-1")   # the only version of its character: wanted
    prepared_dir(old).mkdir()
    (prepared_dir(old) / HEADER).write_text("{}")
    for path in (old, prepared_dir(old), new, other):
        age(path, 2 * HOUR)

    holder = LeaseHolder(old)
    try:
        kept = collect_garbage(store, stale_after_s=HOUR)
        assert old in kept.kept_in_use and old.is_dir() and prepared_dir(old).is_dir()
    finally:
        holder.kill()
    # The holder died without releasing: its lease went with it. The lease file's last use is now, though.
    assert collect_garbage(store, stale_after_s=HOUR).nothing and old.is_dir()
    age(lease_path(old), 2 * HOUR)
    done = collect_garbage(store, stale_after_s=HOUR)
    assert old in done.removed and not old.exists() and not prepared_dir(old).exists()
    assert not lease_path(old).exists()
    assert not [p.name for p in store.iterdir() if p.name.startswith(".demo-1.")]  # its stamps went with it
    assert new.is_dir() and other.is_dir()   # the newest version of each character stays
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["demo-2", "other-1"]
    assert not [p for p in store.iterdir() if p.name.endswith(".old")]


def test_a_recently_extracted_copy_stays_though_unleased(tmp_path):
    """An init container extracted it and its server has not loaded it yet: no lease, but fresh."""
    store = tmp_path / "store"
    old, new = extracted(store, "demo-1"), extracted(store, "demo-2")
    done = collect_garbage(store, stale_after_s=HOUR)
    assert old in done.kept_in_use and old.is_dir() and new.is_dir()
    # The lease file the collection made to decide is dated the copy's last use, not now.
    last_use = max(old.stat().st_mtime, (old / "manifest.json").stat().st_mtime)
    assert lease_path(old).stat().st_mtime <= last_use


def test_leftovers_go_but_not_what_a_preparation_or_an_extraction_is_writing(tmp_path):
    store = tmp_path / "store"
    live = extracted(store, "demo-2")
    hex32 = lambda: uuid.uuid4().hex  # noqa: E731
    orphan_templates = store / ".gone-1.templates"            # its copy was removed by hand
    dead_prepare = store / f".demo-2.templates.{hex32()}.partial"
    busy_prepare = store / f".other-1.templates.{hex32()}.partial"
    dead_extract = store / f".gone-2.{hex32()}.partial"
    busy_extract = store / f".other-2.{hex32()}.partial"
    fresh_extract = store / f".other-3.{hex32()}.partial"
    old = store / f".demo-2.templates.{hex32()}.old"
    stamp_tmp = store / f".demo-2.source.{hex32()}.tmp"
    for directory in (orphan_templates, dead_prepare, busy_prepare, dead_extract, busy_extract, fresh_extract, old):
        directory.mkdir()
        (directory / "crops.u8").write_bytes(b"x" * 100)
    stamp_tmp.write_text("{}")
    for path in (orphan_templates, dead_prepare, busy_prepare, dead_extract, busy_extract, old, stamp_tmp):
        age(path, 2 * HOUR)
    download = tmp_path / f".demo-3.zip.{hex32()}.part"
    download.write_bytes(b"z")
    age(download, 2 * HOUR)

    # Another process is preparing other-1 (it holds the lock) and extracting other-2 (it leases the copy).
    code = ("import fcntl, sys, time; from pathlib import Path; "
            "from inference_pod.serving.node_store import CopyLease; "
            "fh = open(sys.argv[1], 'a+b'); fcntl.flock(fh, fcntl.LOCK_EX); CopyLease.take(Path(sys.argv[2])); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store / ".other-1.templates.lock"),
                             str(store / "other-2")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        age(lease_path(store / "other-2"), 2 * HOUR)   # held matters, not the age
        done = collect_garbage(store, tmp_path, stale_after_s=HOUR)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    for gone in (orphan_templates, dead_prepare, dead_extract, old, stamp_tmp, download):
        assert not gone.exists(), gone
        assert gone in done.removed
    for kept in (busy_prepare, busy_extract, fresh_extract, live, store / ".other-1.templates.lock"):
        assert kept.exists(), kept
    # Now that no one prepares other-1, its temporary directory goes too.
    collect_garbage(store, stale_after_s=HOUR)
    assert not busy_prepare.exists() and fresh_extract.exists()


def test_a_lease_taken_while_its_copy_is_collected_sees_it_whole_or_gone(tmp_path):
    """Collections and lessees race on one copy: a lessee never finds a copy half-removed."""
    store = tmp_path / "store"
    extracted(store, "demo-2")
    errors: list[str] = []
    stop = threading.Event()
    copy = store / "demo-1"

    go = threading.Semaphore(0)  # one round of leases per copy extracted, racing its collection

    def lessee():
        while go.acquire(timeout=60) and not stop.is_set():
            for _ in range(3):
                lease = CopyLease.take(copy)
                try:
                    if copy.exists():
                        members = read_manifest(copy).members
                        missing = [m for m in members if not (copy / m).is_file()]
                        if missing:
                            errors.append(f"leased copy lacks {missing[:3]}")
                finally:
                    lease.release()

    thread = threading.Thread(target=lessee)
    thread.start()
    collected = 0
    try:
        for _ in range(60):
            if collected >= 3:
                break
            extracted(store, "demo-1")
            go.release()  # the lessee's round overlaps the ageing and the collection, or ends before them
            age(copy, 2 * HOUR)
            with suppress(FileNotFoundError):  # the lessee's release removes it while the copy is gone
                age(lease_path(copy), 2 * HOUR)
            collected += copy in collect_garbage(store, stale_after_s=HOUR).removed
    finally:
        stop.set()
        go.release()
        thread.join(timeout=60)
    assert errors == []
    assert collected > 0   # the race was run: some collections did remove the copy


async def test_a_replaced_version_is_collected_after_its_unload_unless_another_pod_holds_it(tmp_path):
    models = models_dir_with(tmp_path / "models", "demo-1")
    shared = tmp_path / "node-store"   # two pods' stores on one node
    pod_a, pod_b = pod_store(models, shared), pod_store(models, shared)
    assert (await pod_a.get("demo")).version == "1"
    assert (await pod_b.get("demo")).version == "1"   # pod B serves pod A's extraction
    models_dir_with(models, "demo-2")
    await pod_b.load("demo", "2")
    await pod_b.unload("demo")   # pod B no longer holds version 1 or 2; pod A still serves 1
    assert (shared / "demo-1").is_dir() and prepared_dir(shared / "demo-1").is_dir()
    await pod_a.load("demo", "2")   # replaces 1 in pod A: now no one holds it, and its retirement collects
    await wait_until_async(lambda: not (shared / "demo-1").exists(), what="version 1's copy collected")
    assert not prepared_dir(shared / "demo-1").exists()
    await pod_a.close()
    assert (shared / "demo-2").is_dir()
    # The old version is still there as a zip: asked for by name, it is extracted again.
    model, source, _ = await pod_b.load("demo", "1")
    assert (model.version, source) == ("1", "zip") and (shared / "demo-1").is_dir()
    await pod_b.close()


async def test_the_pod_that_replaced_another_collects_its_version_without_unloading_anything(tmp_path):
    """A rolling update: the old pod served version 1 and is gone; the new pod only ever loaded version 2."""
    models = models_dir_with(tmp_path / "models", "demo-1")
    shared = tmp_path / "node-store"
    old_pod = pod_store(models, shared)
    assert (await old_pod.get("demo")).version == "1"
    await old_pod.close()
    models_dir_with(models, "demo-2")
    new_pod = pod_store(models, shared)
    new_pod.collect_every_s = 0.05
    assert (await new_pod.get("demo")).version == "2"
    await wait_until_async(lambda: not (shared / "demo-1").exists(), what="version 1's copy collected")
    assert (shared / "demo-2").is_dir() and prepared_dir(shared / "demo-2").is_dir()
    await new_pod.close()


def test_two_init_containers_racing_to_fetch_and_prepare_one_package(tmp_path):
    """Two ``lipsync package fetch --prepare`` into one node store at once: both succeed, one complete copy
    and one prepared directory result, and no watcher ever sees a partial copy or a partial prepared dir."""
    registry = tmp_path / "registry"
    subprocess.run([sys.executable, "-m", "inference_pod.cli", "package", "demo", "--random-weights", "--frames",
                    "120", "--size", "640x360", "--out", str(tmp_path / "big-1.zip"), "--name", "big"],
                   check=True, capture_output=True)
    publish(tmp_path / "big-1.zip", registry)
    out = tmp_path / "models"
    copy, prepared = out / ".store" / "big-1", prepared_dir(out / ".store" / "big-1")
    manifest = read_manifest(tmp_path / "big-1.zip")
    problems: list[str] = []
    done = threading.Event()

    def watch():
        seen_copy = seen_prepared = 0
        while not done.is_set():
            if copy.is_dir():
                missing = [m for m, e in manifest.members.items()
                           if not (copy / m).is_file() or (copy / m).stat().st_size != e["size"]]
                if missing and copy.is_dir():
                    problems.append(f"copy visible without {missing[:2]}")
                seen_copy += 1
            if prepared.is_dir():
                try:
                    header = json.loads((prepared / HEADER).read_text())
                    for name, spec in header["files"].items():
                        if "shape" in spec:
                            size = (prepared / name).stat().st_size
                            n = 1
                            for d in spec["shape"]:
                                n *= d
                            if size != n:
                                problems.append(f"{name} is {size} bytes of {n}")
                except FileNotFoundError as exc:
                    if prepared.is_dir():
                        problems.append(f"prepared directory visible without {exc.filename}")
                seen_prepared += 1
        watched.extend([seen_copy, seen_prepared])

    watched: list[int] = []
    watcher = threading.Thread(target=watch)
    watcher.start()
    command = [sys.executable, "-m", "inference_pod.cli", "package", "fetch", "big", "--registry",
               file_url(registry), "--version", "1", "--out", str(out), "--prepare"]
    try:
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        done.set()
        watcher.join(timeout=60)
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
        assert f"prepared 120 templates in {prepared}" in stdout
    assert problems == []
    assert watched[0] > 0 and watched[1] > 0   # the watcher did look at both while they existed
    assert sorted(p.name for p in (out / ".store").iterdir()) == sorted(
        ["big-1", ".big-1.templates", ".big-1.templates.lock", ".big-1.source", ".big-1.checked", ".big-1.lease"])
    assert [p.name for p in out.iterdir() if p.name != ".store"] == ["big-1.zip"]
    header = json.loads((prepared / HEADER).read_text())
    assert header["count"] == 120 and header["package"]["version"] == "1"
