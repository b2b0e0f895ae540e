"""Tiered model loading (memory, store, zip, registry), one load per model, LRU eviction, unloading."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
from conditions import wait_until_async
from serving_support import (
    StaticRegistry,
    free_port,
    grow_filesystem,
    models_dir_with,
    package,
    small_filesystem,
)

from inference_pod.core.engine import Engine
from inference_pod.errors import InvalidInput, ModelNotFound, StorageFull, Unavailable
from inference_pod.serving.batcher import Batcher
from inference_pod.serving.metrics import Metrics
from inference_pod.serving.model_store import ModelStore
from inference_pod.serving.registry import RegistryClient, publish

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store-registry")
    publish(package("other-1"), root)
    return root


class Counting:
    """The real engine factory, counting how often it runs."""

    def __init__(self):
        self.calls = []

    def __call__(self, package):
        self.calls.append(package.manifest.name)
        return Engine.from_package(package, max_batch=4)


def make_store(models_dir: Path, metrics: Metrics, registry_url: str | None = None, budget: int = 0,
               factory=None, events: list | None = None, extract_dir: Path | None = None,
               retries: int = 1) -> ModelStore:
    async def loaded(model):
        if events is not None:
            events.append(("loaded", model.name, model.version))

    async def unloaded(name):
        if events is not None:
            events.append(("unloaded", name))

    registry = RegistryClient(registry_url, retries=retries, backoff_s=0.01) if registry_url else None
    return ModelStore(models_dir=models_dir, extract_dir=extract_dir or models_dir / ".store", metrics=metrics,
                      engine_factory=factory or Counting(),
                      batcher_factory=lambda name, engine: Batcher(name, engine, metrics, max_batch=4),
                      registry=registry, memory_budget_bytes=budget, on_loaded=loaded, on_unloaded=unloaded)


def loads(metrics: Metrics, model: str, source: str, result: str = "ok") -> float:
    return metrics.sample("lipsync_model_loads_total", {"model": model, "source": source, "result": result})


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return models_dir_with(tmp_path / "models", "demo-1")


async def test_tiers_zip_then_memory_then_store(models_dir):
    metrics = Metrics()
    store = make_store(models_dir, metrics)
    model, source, _ = await store.load("demo")
    assert (source, model.version, model.name) == ("zip", "1", "demo")
    assert (models_dir / ".store" / "demo-1" / "manifest.json").is_file()
    assert (await store.load("demo"))[1] == "memory"
    assert metrics.sample("lipsync_models_resident") == 1
    await store.close()

    # A restarted pod finds the extracted copy and skips the zip.
    metrics = Metrics()
    store = make_store(models_dir, metrics)
    assert (await store.load("demo"))[1] == "store"
    assert loads(metrics, "demo", "store") == 1 and loads(metrics, "demo", "zip") == 0
    assert metrics.sample("lipsync_model_load_duration_seconds_count") == 1
    await store.close()


async def test_registry_tier_downloads_next_to_the_local_packages(models_dir, registry_dir):
    registry = StaticRegistry(registry_dir)
    try:
        metrics = Metrics()
        store = make_store(models_dir, metrics, registry.url)
        model, source, _ = await store.load("other")
        assert source == "registry" and model.name == "other"
        assert (models_dir / "other-1.zip").is_file()
        assert loads(metrics, "other", "registry") == 1
        assert sorted(store.catalog.local_packages()) == ["demo", "other"]
        await store.close()
    finally:
        registry.close()


async def test_concurrent_requests_share_one_load(models_dir):
    metrics = Metrics()
    factory = Counting()
    store = make_store(models_dir, metrics, factory=factory)

    async def request():
        async with store.use("demo") as model:
            return model

    models = await asyncio.gather(*(request() for _ in range(8)))
    assert factory.calls == ["demo"]
    assert len({id(m) for m in models}) == 1
    assert loads(metrics, "demo", "zip") == 1
    await store.close()


async def test_least_recently_used_model_is_unloaded_to_fit_the_budget(models_dir):
    models_dir_with(models_dir, "other-1")
    metrics = Metrics()
    events = []
    probe = make_store(models_dir, Metrics())
    size = (await probe.get("demo")).memory().total
    await probe.close()
    store = make_store(models_dir, metrics, budget=int(size * 1.5), events=events)  # room for one model
    demo = await store.get("demo")
    await store.get("other")
    assert [m.name for m in store.resident] == ["other"]
    # Retirement runs in the background: the unload is announced, then the engine released.
    await wait_until_async(lambda: demo.engine.net is None, what="demo's engine to be released")
    assert events == [("loaded", "demo", "1"), ("loaded", "other", "1"), ("unloaded", "demo")]
    assert metrics.sample("lipsync_models_resident") == 1
    await store.close()


async def test_a_models_memory_is_read_now_not_at_load(models_dir):
    """Template encodings and decoded frames are cached after load: what the store reports and budgets grows."""
    store = make_store(models_dir, Metrics())
    model = await store.get("demo")
    at_load = model.memory()
    assert at_load.total == at_load.device + at_load.host == store.resident_bytes > 0
    engine = model.engine
    ids = list(range(3))
    templates = [engine.template_index(i) for i in ids]
    for t, prediction in zip(templates, engine.predict(templates, engine.windows(engine.default_features, ids)),
                             strict=True):
        engine.full_frame_jpeg(t, prediction, 90)
    now = model.memory()
    assert now.host > at_load.host and now.device == at_load.device
    assert now.total == store.resident_bytes == engine.memory_bytes()
    await store.close()


async def test_recently_used_models_survive_eviction(models_dir):
    models_dir_with(models_dir, "other-1", "twin-1")
    store = make_store(models_dir, Metrics())
    size = (await store.get("demo")).memory().total
    store.memory_budget_bytes = int(size * 2.5)  # room for two
    other = await store.get("other")
    await store.get("demo")  # demo is now more recently used than other
    await store.get("twin")
    assert sorted(m.name for m in store.resident) == ["demo", "twin"]
    await wait_until_async(lambda: other.engine.net is None, what="other's engine to be released")
    await store.close()


async def test_unload_waits_for_in_flight_use(models_dir):
    events = []
    store = make_store(models_dir, Metrics(), events=events)
    async with store.use("demo") as model:
        unloading = asyncio.ensure_future(store.unload("demo"))
        # The unload announces the model gone, then waits for the request in flight, which keeps the engine.
        await wait_until_async(lambda: ("unloaded", "demo") in events, what="the unload to announce demo gone")
        assert store.resident == [] and model.engine.net is not None
        assert not unloading.done()
    assert await unloading is True
    assert model.engine.net is None  # released once idle
    assert events[-1] == ("unloaded", "demo")
    assert await store.unload("demo") is False
    with pytest.raises(ModelNotFound):
        await store.unload("nobody")
    await store.close()


async def test_a_new_version_replaces_the_old(models_dir):
    events = []
    store = make_store(models_dir, Metrics(), events=events)
    assert (await store.get("demo")).version == "1"
    models_dir_with(models_dir, "demo-2")
    model, source, _ = await store.load("demo", "2")
    assert (model.version, source) == ("2", "zip")
    assert (await store.get("demo")).version == "2"
    assert ("loaded", "demo", "2") in events and ("unloaded", "demo") not in events
    await store.close()
    # Without a version, the newest local one is chosen.
    store = make_store(models_dir, Metrics())
    assert (await store.get("demo")).version == "2"
    await store.close()


async def test_unknown_bad_and_unreachable(models_dir):
    store = make_store(models_dir, Metrics())
    with pytest.raises(ModelNotFound, match="no registry"):
        await store.get("nobody")
    for bad in ("../demo", "Demo", "", "a" * 64, "demo/x"):
        with pytest.raises(InvalidInput):
            await store.get(bad)
    await store.close()

    store = make_store(models_dir, Metrics(), f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(Unavailable, match="registry unreachable"):
        await store.get("nobody")
    assert (await store.get("demo")).name == "demo"  # local models are unaffected
    await store.close()


async def test_registry_checksum_mismatch_is_unavailable_and_counted(models_dir, registry_dir, tmp_path):
    broken = Path(shutil.copytree(registry_dir, tmp_path / "broken"))
    stored = broken / "other/1/other-1.zip"
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0xFF
    stored.write_bytes(bytes(data))
    registry = StaticRegistry(broken)
    try:
        metrics = Metrics()
        store = make_store(models_dir, metrics, registry.url)
        with pytest.raises(Unavailable, match="sha256 mismatch"):
            await store.get("other")
        assert loads(metrics, "other", "registry", "error") == 1
        assert not (models_dir / "other-1.zip").exists()
        await store.close()
    finally:
        registry.close()


async def test_corrupt_local_zip_is_skipped_in_the_catalog_and_fails_clearly(models_dir):
    (models_dir / "junk.zip").write_bytes(b"not a zip")
    store = make_store(models_dir, Metrics())
    assert list(store.catalog.local_packages()) == ["demo"]
    await store.close()
    # A zip whose members are damaged after its manifest was read: extraction fails, the error says why.
    target = models_dir / "demo-1.zip"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    metrics = Metrics()
    store = make_store(models_dir, metrics)
    with pytest.raises(Unavailable, match="cannot be loaded"):
        await store.get("demo")
    assert loads(metrics, "demo", "zip", "error") == 1
    await store.close()


# ------------------------------------------------------------------------------------------ hostile packages


def _rewrite_manifest(path: Path, **fields) -> None:
    """Change manifest fields of an extracted package directory (its members stay as they are)."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(fields)
    (path / "manifest.json").write_text(json.dumps(manifest))


async def test_a_package_that_cannot_load_is_remembered_until_its_file_changes(tmp_path):
    """A manifest claiming another width: the weights do not fit. Every request used to rebuild and fail
    (4-15 s and +3 GB each at width 256); now the failure is remembered by the file's identity."""
    from inference_pod.package import extract_package

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    stored = extract_package(package("demo-1"), models_dir / ".store" / "demo-1").root
    _rewrite_manifest(stored, model_width=256)
    metrics, factory = Metrics(), Counting()
    store = make_store(models_dir, metrics, factory=factory)
    for _ in range(3):
        with pytest.raises(Unavailable, match="it holds a width-4 U-Net, not model_width 256"):
            await store.get("demo")
    assert factory.calls == ["demo"]  # built (and refused) once, not once per request
    assert loads(metrics, "demo", "store", "error") == 3  # every refusal is still counted
    _rewrite_manifest(stored, model_width=4)  # fixed (serving_support's packages are width 4): tried again
    assert (await store.get("demo")).name == "demo" and factory.calls == ["demo", "demo"]
    await store.close()


async def test_a_broken_zip_is_not_extracted_again_for_every_request(tmp_path, caplog):
    import zipfile

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    with zipfile.ZipFile(package("demo-1")) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    manifest["model_width"] = 256
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(models_dir / "demo-1.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    metrics = Metrics()
    store = make_store(models_dir, metrics)
    with caplog.at_level("WARNING", logger="inference_pod.serving.model_store"):
        for _ in range(3):
            with pytest.raises(Unavailable, match="not model_width 256"):
                await store.get("demo")
    unusable = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(unusable) == 1  # extracted and checked once; the next requests get the remembered answer
    assert loads(metrics, "demo", "zip", "error") == 3
    assert not (models_dir / ".store" / "demo-1").exists()  # nothing half-extracted was kept
    await store.close()


def _heavy_manifest_zip(path: Path, frames: int) -> None:
    """A zip whose manifest lists ``frames`` frames it does not hold: real bytes to parse, then refused."""
    import zipfile

    manifest = json.loads(zipfile.ZipFile(package("demo-1")).read("manifest.json"))
    entry = {"sha256": "0" * 64, "size": 1}
    manifest["members"] |= {f"frames/{i:06d}.jpg": entry for i in range(frames)}
    manifest["frame_count"] = frames
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))


class _Events(logging.Handler):
    """Log records and the test's own events in one list, in the order they happened (any thread)."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.getMessage())


async def test_a_slow_scan_does_not_stall_other_requests(tmp_path):
    """ListModels scanned --models-dir on the event loop: a 5,000,000-frame claim stalled every request 9.7 s.
    The scan now runs in a thread; a request for a resident model is answered while it runs. Checked by order,
    not by the clock: between the scan skipping its first heavy zip and its last, requests were answered (on
    the event loop, all four would be skipped in one go, with nothing answered in between)."""
    models_dir = models_dir_with(tmp_path / "models", "demo-1")
    store = make_store(models_dir, Metrics())
    await store.get("demo")
    heavy = [models_dir / f"heavy-{i}.zip" for i in range(4)]
    for path in heavy:
        _heavy_manifest_zip(path, 150_000)

    events: list[str] = []
    handler = _Events(events)
    logger = logging.getLogger("inference_pod.serving.catalog")
    logger.addHandler(handler)
    scan = asyncio.ensure_future(store.catalog.scan())
    try:
        while not scan.done():
            async with store.use("demo") as model:
                assert model.name == "demo"
            events.append("answered")
            await asyncio.sleep(0)  # the next request, after whatever else is ready
        catalog = await scan
    finally:
        logger.removeHandler(handler)
    assert list(catalog) == ["demo"]  # the heavy zips were read, refused and skipped
    skipped = [i for i, event in enumerate(events) if event.startswith("skipping") and "heavy-" in event]
    assert len(skipped) == len(heavy), events
    answered_during = events[skipped[0] : skipped[-1]].count("answered")
    assert answered_during > 0, f"no request was answered while the scan read {len(heavy)} heavy zips"
    await store.close()


async def test_a_zip_damaged_after_extraction_is_reported_while_its_checked_copy_serves(models_dir, caplog):
    """The extracted copy was checked when it was made, so it keeps serving; the damaged zip is named in a
    warning (it is what the next pod extracts), on every load until it is replaced."""
    store = make_store(models_dir, Metrics())
    assert (await store.load("demo"))[1] == "zip"
    await store.close()
    target = models_dir / "demo-1.zip"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a member: same manifest, different bytes
    target.write_bytes(bytes(data))
    for _ in range(2):
        store = make_store(models_dir, Metrics())
        with caplog.at_level("WARNING", logger="inference_pod.package.extract"):
            caplog.clear()
            model, source, _ = await store.load("demo")
        assert (model.name, source) == ("demo", "store")
        damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(damaged) == 1 and str(target) in damaged[0] and "replace the zip" in damaged[0]
        await store.close()
    target.write_bytes(package("demo-1").read_bytes())  # replaced: intact again, and quiet
    store = make_store(models_dir, Metrics())
    with caplog.at_level("WARNING", logger="inference_pod.package.extract"):
        caplog.clear()
        assert (await store.load("demo"))[1] == "store"
    assert not [r for r in caplog.records if "is damaged" in r.getMessage()]
    await store.close()


# ------------------------------------------------------------------------------------------ package files that mislead


async def test_a_package_file_named_for_another_model_is_said_so(tmp_path, caplog):
    """alice.zip holding demo serves as demo (the manifest names a model); the log says so once, and a request
    for alice hears why it is not there instead of a bare NOT_FOUND."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    shutil.copy(package("demo-1"), models_dir / "alice.zip")
    store = make_store(models_dir, Metrics())
    with caplog.at_level("WARNING", logger="inference_pod.serving.model_store"):
        for _ in range(2):
            with pytest.raises(ModelNotFound) as info:
                await store.get("alice")
            assert "alice.zip was not taken as 'alice': it holds model 'demo' (version 1)" in str(info.value)
    warnings = [r.getMessage() for r in caplog.records if "alice.zip" in r.getMessage()]
    assert len(warnings) == 1 and "holds model 'demo'" in warnings[0], warnings
    assert (await store.get("demo")).name == "demo"
    with pytest.raises(ModelNotFound) as info:
        await store.get("nobody")
    assert "alice.zip" not in str(info.value)  # only files named for the model asked about are mentioned
    await store.close()


@pytest.mark.parametrize("file_name", ["demo-1.zip", "demo.zip"])
async def test_a_damaged_package_file_is_named_in_the_not_found(tmp_path, caplog, file_name):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / file_name).write_bytes(b"PK\x03\x04 but not really a zip")
    store = make_store(models_dir, Metrics())
    with caplog.at_level("WARNING", logger="inference_pod.serving.model_store"):
        for _ in range(3):
            with pytest.raises(ModelNotFound) as info:
                await store.get("demo")
            message = str(info.value)
            assert f"{file_name} was skipped: it is damaged (not a zip file" in message and "replace it" in message
    assert len([r for r in caplog.records if file_name in r.getMessage()]) == 1  # once per package file
    await store.close()


# ------------------------------------------------------------------------------------------ a full disk


async def test_a_full_disk_during_extraction_is_a_clear_error_until_space_is_freed(models_dir, tmp_path, caplog):
    """The store on a real 2 MiB filesystem, the package about 11 MB: RESOURCE_EXHAUSTED naming the disk and
    the flag, one warning line per attempt and no traceback, nothing half-extracted left; once the disk has
    room the next request loads (a full disk is not remembered as a broken package)."""
    with small_filesystem(tmp_path / "small") as disk:
        metrics = Metrics()
        store = make_store(models_dir, metrics, extract_dir=disk / "store")
        with caplog.at_level("WARNING"):
            for _ in range(2):
                with pytest.raises(StorageFull) as info:
                    await store.get("demo")
                message = str(info.value)
                assert "no space left on device extracting demo-1.zip into" in message and "--store-dir" in message
                assert info.value.grpc_status == "RESOURCE_EXHAUSTED"
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert len([r for r in caplog.records if "no space left" in r.getMessage()]) == 2
        assert [p.name for p in disk.rglob("*")] == ["store"], "something half-extracted was left"
        assert loads(metrics, "demo", "zip", "error") == 2
        grow_filesystem(disk, "64m")
        assert (await store.get("demo")).name == "demo"
        await store.close()


async def test_a_full_disk_during_download_is_not_retried(models_dir, registry_dir, tmp_path):
    registry = StaticRegistry(registry_dir)
    try:
        with small_filesystem(tmp_path / "small") as disk:
            store = make_store(disk / "models", Metrics(), registry.url, extract_dir=models_dir / ".store",
                               retries=3)
            with pytest.raises(StorageFull) as info:
                await store.get("other")
            message = str(info.value)
            assert "no space left on device downloading other 1" in message and "--models-dir" in message
            assert len([path for path in registry.requests if path.endswith(".zip")]) == 1  # not retried
            assert list((disk / "models").iterdir()) == []  # no partial download left
            await store.close()
    finally:
        registry.close()
