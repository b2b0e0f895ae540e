"""The registry: publish into a static directory, fetch over a real HTTP server (and file://), verify,
retry with backoff, fail clearly."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from serving_support import StaticRegistry, free_port, package

from inference_pod.errors import ModelNotFound, PackageError, Unavailable
from inference_pod.serving.registry import RegistryClient, fetch, file_url, publish, version_key


@pytest.fixture(scope="module")
def packages() -> dict[str, Path]:
    return {"1": package("demo-1"), "2": package("demo-2"), "other": package("other-1")}


@pytest.fixture(scope="module")
def published(tmp_path_factory, packages) -> Path:
    root = tmp_path_factory.mktemp("published") / "registry"
    for key in ("1", "2", "other"):
        publish(packages[key], root)
    return root


@pytest.fixture
def registry_dir(tmp_path, published) -> Path:
    """A fresh copy of a registry holding demo 1, demo 2 and other 1, for each test to modify."""
    return Path(shutil.copytree(published, tmp_path / "registry"))


@pytest.fixture
def http_registry(registry_dir):
    server = StaticRegistry(registry_dir)
    yield server
    server.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_partials(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")] if directory.exists() else True


def test_publish_writes_the_layout_and_an_atomic_index(registry_dir, packages):
    index = json.loads((registry_dir / "index.json").read_text())
    entries = {(e["name"], e["version"]): e for e in index["packages"]}
    assert set(entries) == {("demo", "1"), ("demo", "2"), ("other", "1")}
    for (name, version), entry in entries.items():
        assert entry["url"] == f"{name}/{version}/{name}-{version}.zip"
        stored = registry_dir / entry["url"]
        source = packages["other" if name == "other" else version]
        assert entry["size"] == stored.stat().st_size == source.stat().st_size
        assert entry["sha256"] == sha256(stored) == sha256(source)
    assert not [p for p in registry_dir.iterdir() if p.name.endswith(".tmp")]


def test_publish_is_idempotent_and_refuses_changed_contents(registry_dir, packages, demo_package):
    again = publish(packages["1"], registry_dir)
    assert len(json.loads((registry_dir / "index.json").read_text())["packages"]) == 3
    assert again.sha256 == sha256(packages["1"])
    impostor = demo_package  # the shared fixture's demo 1: same name and version, other contents
    assert sha256(impostor) != sha256(packages["1"])
    with pytest.raises(PackageError, match="new version"):
        publish(impostor, registry_dir)
    assert sha256(registry_dir / "demo/1/demo-1.zip") == sha256(packages["1"]), "published file was replaced"


def test_publish_with_a_base_url_and_concurrently(tmp_path, packages):
    root = tmp_path / "cdn"
    threads = [threading.Thread(target=publish, args=(packages[k], root, "https://cdn.example/models/"))
               for k in ("1", "2", "other")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    urls = {e["url"] for e in json.loads((root / "index.json").read_text())["packages"]}
    assert urls == {f"https://cdn.example/models/{n}/{v}/{n}-{v}.zip" for n, v in (("demo", "1"), ("demo", "2"),
                                                                                    ("other", "1"))}


def test_publish_refuses_an_invalid_package(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(PackageError):
        publish(bad, tmp_path / "reg")


def test_versions_order_naturally():
    assert sorted(["1.9", "1.10", "1", "1.9-rc1", "2"], key=version_key) == ["1", "1.9-rc1", "1.9", "1.10", "2"]


def test_fetch_over_http_latest_and_pinned(http_registry, tmp_path, packages):
    latest = fetch(http_registry.url, "demo", None, tmp_path / "dl")
    assert latest.name == "demo-2.zip" and sha256(latest) == sha256(packages["2"])
    pinned = fetch(http_registry.url, "demo", "1", tmp_path / "dl", expected_sha256=sha256(packages["1"]))
    assert pinned.read_bytes() == packages["1"].read_bytes()
    assert no_partials(tmp_path / "dl")
    # An intact copy already in place is not downloaded again.
    before = len(http_registry.requests)
    assert fetch(http_registry.url, "demo", "1", tmp_path / "dl") == pinned
    assert [p for p in http_registry.requests[before:] if p.endswith(".zip")] == []


def test_fetch_accepts_the_index_url_itself(http_registry, tmp_path):
    assert fetch(http_registry.url + "index.json", "demo", "1", tmp_path).name == "demo-1.zip"


def test_checksum_mismatch_fails_and_leaves_nothing(http_registry, registry_dir, tmp_path):
    stored = registry_dir / "demo/2/demo-2.zip"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    stored.write_bytes(bytes(data))
    dest = tmp_path / "dl"
    with pytest.raises(PackageError, match="sha256 mismatch"):
        fetch(http_registry.url, "demo", "2", dest)
    assert not (dest / "demo-2.zip").exists() and no_partials(dest)


def test_expected_checksum_must_match_the_index(http_registry, tmp_path):
    with pytest.raises(PackageError, match="expected"):
        fetch(http_registry.url, "demo", "1", tmp_path, expected_sha256="0" * 64)


def test_oversized_download_is_refused(http_registry, registry_dir, tmp_path):
    stored = registry_dir / "demo/1/demo-1.zip"
    stored.write_bytes(stored.read_bytes() + b"trailing junk")
    with pytest.raises(PackageError, match="more than"):
        fetch(http_registry.url, "demo", "1", tmp_path)
    assert no_partials(tmp_path)


def test_5xx_is_retried_with_backoff_then_succeeds(http_registry, tmp_path):
    delays = []
    client = RegistryClient(http_registry.url, backoff_s=0.01, sleep=delays.append)
    http_registry.fail_next(2)  # the index request fails twice with 503
    path = client.fetch("demo", "1", tmp_path)
    assert path.exists() and delays == [0.01, 0.02]
    assert [p for p in http_registry.requests if p.endswith("index.json")] == ["/index.json"] * 3


def test_unreachable_registry_retries_then_is_unavailable(tmp_path):
    delays = []
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    client = RegistryClient(url, retries=3, backoff_s=0.1, max_backoff_s=0.3, sleep=delays.append)
    with pytest.raises(Unavailable, match="failed 4 times"):
        client.fetch("demo", None, tmp_path)
    assert delays == [0.1, 0.2, 0.3]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_registry_fails_fast_for_a_moment(tmp_path):
    client = RegistryClient(f"http://127.0.0.1:{free_port()}/", retries=0, failure_ttl_s=60)
    with pytest.raises(Unavailable) as first:
        client.list()
    with pytest.raises(Unavailable) as second:
        client.list()
    assert second.value is first.value


def test_private_registry_needs_its_token(registry_dir, tmp_path, monkeypatch):
    server = StaticRegistry(registry_dir, token="s3cret")
    try:
        with pytest.raises(Unavailable, match="HTTP 401"):
            fetch(server.url, "demo", None, tmp_path / "no")
        assert fetch(server.url, "demo", "1", tmp_path / "yes", token="s3cret").name == "demo-1.zip"
        monkeypatch.setenv("LIPSYNC_REGISTRY_TOKEN", "s3cret")  # what the operator's init container sets
        from inference_pod.cli import main

        assert main(["package", "fetch", "demo", "--registry", server.url, "--out", str(tmp_path / "cli")]) == 0
        assert (tmp_path / "cli" / "demo-2.zip").is_file()
    finally:
        server.close()


def test_fetch_prepare_extracts_into_the_store_and_prepares_the_templates(registry_dir, tmp_path, capsys):
    """The init container's ``lipsync package fetch --prepare``: the pod's first load then maps, not derives."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from inference_pod.cli import main
    from inference_pod.core.prepared_templates import HEADER, PreparedTemplates, prepared_dir
    from inference_pod.package import open_package

    out = tmp_path / "models"
    assert main(["package", "fetch", "demo", "--registry", file_url(registry_dir), "--version", "1",
                 "--out", str(out), "--prepare"]) == 0
    copy = out / ".store" / "demo-1"  # where lipsync serve --models-dir OUT looks first
    header = prepared_dir(copy) / HEADER
    assert json.loads(header.read_text())["package"]["version"] == "1"
    assert f"prepared 6 templates in {prepared_dir(copy)}" in capsys.readouterr().out
    before = header.stat().st_ino
    with ThreadPoolExecutor(1) as pool:
        assert PreparedTemplates.open_or_prepare(open_package(copy), pool).mapped
    assert header.stat().st_ino == before  # mapped as it was: nothing prepared again


def test_unknown_model_is_not_found(http_registry, tmp_path):
    with pytest.raises(ModelNotFound, match="nobody"):
        fetch(http_registry.url, "nobody", None, tmp_path)
    with pytest.raises(ModelNotFound):
        fetch(http_registry.url, "demo", "7", tmp_path)
    assert no_partials(tmp_path)


def test_file_url_registry(registry_dir, tmp_path, packages):
    path = fetch(file_url(registry_dir), "demo", "1", tmp_path)
    assert path.read_bytes() == packages["1"].read_bytes()
    with pytest.raises(Unavailable, match="cannot be read"):
        RegistryClient(file_url(tmp_path / "nowhere")).list()


def test_hostile_index_entries_are_rejected(tmp_path, packages):
    root = tmp_path / "evil"
    shutil.copytree(packages["1"].parent, root / "pkg")
    entry = {"name": "../../escape", "version": "1", "size": 1, "sha256": "0" * 64, "url": "x.zip"}
    (root / "index.json").write_text(json.dumps({"packages": [entry]}))
    with pytest.raises(Unavailable, match="invalid name"):
        RegistryClient(file_url(root)).list()
    (root / "index.json").write_text("{not json")
    with pytest.raises(Unavailable, match="not valid JSON"):
        RegistryClient(file_url(root)).list()


def test_registry_urls_must_be_http_or_file():
    from inference_pod.errors import InvalidInput

    with pytest.raises(InvalidInput):
        RegistryClient("ftp://somewhere/")
