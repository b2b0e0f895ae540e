"""Prepared templates (core.prepared_templates): derived once per package version, mapped by every load,
byte-identical frames in every storage mode and load path, damaged or stale directories rebuilt, no load
ever served from a partial one, and the mapped crops shared between processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from inference_pod.core.engine import Engine
from inference_pod.core.prepared_templates import (
    CROPS,
    HEADER,
    PreparedTemplates,
    prepared_dir,
)
from inference_pod.package import extract_package, open_package
from inference_pod.tools.demo_character import build_demo_package

STORAGES = ("device", "host", "compressed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # ten engines' networks on a small, shared CPU


@pytest.fixture(scope="module")
def wide_zips(tmp_path_factory) -> dict[str, Path]:
    """A 320x240 character (its crop box a small part of the frame, so full frames are spliced from the
    border strips), as version 1 and as version 2 with other frames."""
    root = tmp_path_factory.mktemp("prepared-zips")
    zips = {}
    for version, seed in (("1", 1), ("2", 2)):
        zips[version] = root / f"wide-{version}.zip"
        build_demo_package("wide", zips[version], width=4, frames=6, seed=seed, size=(320, 240), audio_seconds=1.0,
                           version=version)
    return zips


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def header(package) -> dict:
    return json.loads((prepared_dir(package.root) / HEADER).read_text())


def frames_of(engine: Engine, ids: list[int]) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """Everything an engine serves for these output frames: prediction, composite, full-frame JPEG (the
    first time and spliced the second), and the template's crop."""
    templates = [engine.template_index(i) for i in ids]
    predictions = engine.predict(templates, engine.windows(engine.default_features, ids))
    out = []
    for t, prediction in zip(templates, predictions, strict=True):
        first = engine.full_frame_jpeg(t, prediction, 75)
        again = engine.full_frame_jpeg(t, prediction, 75)
        out.append((prediction.tobytes(), engine.composite(t, prediction).tobytes(), first.data + again.data,
                    engine.template_crop(t).tobytes()))
    return out


def test_frames_are_byte_identical_in_every_storage_and_load_path(wide_zips, tmp_path):
    ids = list(range(4, 10))  # the walk's templates 5, 4, 3, 2, 1, 0: each once
    store = tmp_path / "store"
    reference = Engine.from_package(extract_package(wide_zips["1"], tmp_path / "derived" / "wide-1"), max_batch=4,
                                    template_storage="device", prepared_templates=False)  # every load derives, as before
    expected = frames_of(reference, ids)
    assert any(reference.full_frame_jpeg(t, reference.template_crop(t), 75).path == "spliced" for t in range(6))
    for storage in STORAGES:
        # zip -> extracted store: the first load prepares; the store's next load maps what it prepared
        from_zip = Engine.from_package(open_package(wide_zips["1"], store), max_batch=4, template_storage=storage)
        assert from_zip.templates.prepared.mapped
        from_store = Engine.from_package(open_package(store / next(p.name for p in store.iterdir()
                                                                     if not p.name.startswith("."))),
                                         max_batch=4, template_storage=storage)
        derived = Engine.from_package(open_package(wide_zips["1"], store), max_batch=4, template_storage=storage,
                                      prepared_templates=False)
        for engine in (from_zip, from_store, derived):
            assert frames_of(engine, ids) == expected, (storage, engine.templates.prepared.mapped)


def test_a_flipped_byte_is_caught_served_right_and_prepared_again(wide_zips, tmp_path, pool):
    package = extract_package(wide_zips["1"], tmp_path / "wide-1")
    computed = PreparedTemplates.compute(package, pool)
    PreparedTemplates.open_or_prepare(package, pool)
    crops = prepared_dir(package.root) / CROPS
    data = bytearray(crops.read_bytes())
    data[3 * 328 * 328 * 3 + 1000] ^= 0x40  # inside template 3's crop
    crops.write_bytes(bytes(data))

    damaged = PreparedTemplates.open_or_prepare(package, pool)  # sizes and header fine: mapped
    assert damaged.mapped and damaged._crops[3].tobytes() != computed.crop(3).tobytes()
    assert np.array_equal(damaged.crop(3), computed.crop(3))  # caught on first use, rebuilt from the package
    assert not prepared_dir(package.root).exists()  # so that the next load prepares again

    again = PreparedTemplates.open_or_prepare(package, pool)
    assert again.mapped and again._crops.tobytes() == computed._crops.tobytes()


def test_compressed_loads_map_the_pngs_the_first_one_wrote_and_survive_a_damaged_one(wide_zips, tmp_path, pool):
    from inference_pod.core.engine.template_store import PNG_LEVEL

    package = extract_package(wide_zips["1"], tmp_path / "wide-1")
    computed = PreparedTemplates.compute(package, pool)
    crops = [computed.crop(t)[4:-4, 4:-4].tobytes() for t in range(6)]  # the inner regions template_crop gives
    expected = computed.pngs(PNG_LEVEL, pool)
    assert not expected.mapped  # nowhere to write: encoded in memory, as every compressed load did before
    first = Engine.from_package(package, max_batch=4, template_storage="compressed")
    pngs = prepared_dir(package.root) / f"png-level{PNG_LEVEL}" / "crops.png"
    assert first.templates._pngs.mapped and pngs.is_file()
    written = pngs.stat().st_mtime_ns
    second = Engine.from_package(open_package(package.root), max_batch=4, template_storage="compressed")
    assert second.templates._pngs.mapped and pngs.stat().st_mtime_ns == written  # mapped, not encoded again
    assert [bytes(second.templates._pngs[i]) for i in range(6)] == [expected[i] for i in range(6)]
    use = second.memory_use()
    assert use.mapped >= second.templates._pngs.nbytes > 0  # page cache, not this process's memory

    data = bytearray(pngs.read_bytes())
    data[len(data) // 2] ^= 0x10
    pngs.write_bytes(bytes(data))
    damaged = Engine.from_package(open_package(package.root), max_batch=4, template_storage="compressed")
    assert [damaged.template_crop(t).tobytes() for t in range(6)] == crops
    assert not pngs.exists()  # so that the next compressed load writes them again
    again = Engine.from_package(open_package(package.root), max_batch=4, template_storage="compressed")
    assert again.templates._pngs.mapped and pngs.read_bytes() == b"".join(expected[i] for i in range(6))


@pytest.mark.parametrize("damage", ["small file", "truncated", "no header", "format version"])
def test_a_damaged_directory_is_prepared_again_at_open(wide_zips, tmp_path, pool, damage):
    package = extract_package(wide_zips["1"], tmp_path / "wide-1")
    computed = PreparedTemplates.compute(package, pool)
    directory = prepared_dir(package.root)
    PreparedTemplates.open_or_prepare(package, pool)
    if damage == "small file":
        path = directory / "boxes.npy"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        with open(directory / CROPS, "r+b") as fh:
            fh.truncate(1000)
    elif damage == "no header":  # what a writer that is not atomic leaves behind mid-way
        (directory / HEADER).unlink()
    else:
        meta = json.loads((directory / HEADER).read_text())
        meta["format_version"] = 99
        (directory / HEADER).write_text(json.dumps(meta))
    prepared = PreparedTemplates.open_or_prepare(package, pool)
    assert prepared.mapped and prepared._crops.tobytes() == computed._crops.tobytes()
    assert header(package)["format_version"] == 1


def test_another_version_of_the_package_is_prepared_again(wide_zips, tmp_path, pool):
    root = tmp_path / "wide"
    first = extract_package(wide_zips["1"], root)
    PreparedTemplates.open_or_prepare(first, pool)
    assert header(first)["package"]["version"] == "1"
    second = extract_package(wide_zips["2"], root)  # the same directory now holds version 2
    prepared = PreparedTemplates.open_or_prepare(second, pool)
    assert header(second)["package"]["version"] == "2"
    assert prepared._crops.tobytes() == PreparedTemplates.compute(second, pool)._crops.tobytes()


def test_loads_racing_a_preparation_never_see_a_partial_directory(wide_zips, tmp_path):
    """Loads that start together: one prepares, the others wait for it (the lock) and map the result; a
    load that finds the directory absent or half-written never maps it."""
    package = extract_package(wide_zips["1"], tmp_path / "wide-1")
    with ThreadPoolExecutor(2) as pool:
        expected = PreparedTemplates.compute(package, pool)._crops.tobytes()
    results: list[PreparedTemplates] = []
    barrier = threading.Barrier(4)

    def load() -> None:
        with ThreadPoolExecutor(1) as own_pool:
            barrier.wait(timeout=60)
            results.append(PreparedTemplates.open_or_prepare(package, own_pool))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 4 and all(r.mapped and r._crops.tobytes() == expected for r in results)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith((".partial", ".old"))]
    assert leftovers == []


def test_an_unwritable_store_derives_in_memory(wide_zips, tmp_path, pool):
    store = tmp_path / "store"
    package = extract_package(wide_zips["1"], store / "wide-1")
    with read_only(store):
        prepared = PreparedTemplates.open_or_prepare(package, pool)
    assert not prepared.mapped and prepared.count == 6


@contextlib.contextmanager
def read_only(directory: Path):
    """``directory`` unwritable for this process: by its mode for a user, by a read-only bind mount for root
    (which writes through modes), as a read-only volume is in a pod."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], capture_output=True,
                             text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount the store read-only: {mounted.stderr.strip()}")
    try:
        assert not _writable(directory), "the read-only bind mount is writable"
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


def _writable(directory: Path) -> bool:
    try:
        (directory / "probe").touch()
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


MAP_AND_HOLD = """
import sys
from concurrent.futures import ThreadPoolExecutor
from inference_pod.package import open_package
from inference_pod.core.prepared_templates import PreparedTemplates
with ThreadPoolExecutor(1) as pool:
    prepared = PreparedTemplates.open_or_prepare(open_package(sys.argv[1]), pool)
total = sum(int(prepared.crop(i).sum()) for i in range(prepared.count))  # every page of the crops touched
print("ready", total, flush=True)
sys.stdin.read()  # held until the test has read /proc
"""


def crops_mapping(pid: int, crops: Path) -> dict[str, int]:
    """The kB fields of this process's mapping of the crops file (/proc/PID/smaps)."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and not parts[0].endswith(":"):  # a mapping's first line
            inside = len(parts) >= 6 and parts[-1] == str(crops)
        elif inside and line.endswith(" kB"):
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/PID/smaps")
def test_two_processes_share_the_mapped_crops(wide_zips, tmp_path, pool):
    package = extract_package(wide_zips["1"], tmp_path / "wide-1")
    directory = Path(PreparedTemplates.open_or_prepare(package, pool).directory or "")
    crops = (directory / CROPS).resolve()
    procs = [subprocess.Popen([sys.executable, "-c", MAP_AND_HOLD, str(package.root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().split()[0] for p in procs] == ["ready", "ready"]  # type: ignore[union-attr]
        first, second = (crops_mapping(p.pid, crops) for p in procs)
    finally:
        for p in procs:
            p.communicate("", timeout=60)
    size_kb = crops.stat().st_size // 1024
    for mapping in (first, second):
        assert mapping["Rss"] >= size_kb * 0.9  # resident: every crop was read
        assert mapping["Private_Clean"] + mapping["Private_Dirty"] == 0  # none of it this process's alone
        assert mapping["Pss"] <= mapping["Rss"] / 2 + 8  # its share: half, with two processes mapping it
