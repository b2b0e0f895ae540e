"""The frame and feature caches: in-process LRU, a real redis-server, its outage and its recovery."""

from __future__ import annotations

import logging
import os
import signal
import socket

import numpy as np
import pytest
import redis
from conditions import wait_until_async
from serving_support import RedisServer

from inference_pod.serving.cache import Cache, CachedFrame, MemoryStore
from inference_pod.serving.metrics import Metrics


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def frame(n: int = 1) -> CachedFrame:
    return CachedFrame(image=bytes([n]) * 100, width=48, height=40, template_id=n, crop_box=(1, 2, 30, 31, 29))


def lookups(metrics: Metrics, kind: str, result: str) -> float:
    return metrics.sample("lipsync_cache_requests_total", {"kind": kind, "result": result})


def test_cached_frame_round_trips_and_rejects_garbage():
    f = frame(3)
    assert CachedFrame.from_bytes(f.to_bytes()) == f
    with pytest.raises(ValueError):
        CachedFrame.from_bytes(b"XXXX" + f.to_bytes()[4:])
    with pytest.raises(ValueError):
        CachedFrame.from_bytes(b"short")


def test_memory_store_is_a_byte_bounded_lru_with_expiry():
    store = MemoryStore(max_bytes=300)
    for key in "abc":
        store.set(key, b"x" * 100, ttl_s=60)
    assert store.get("a") == b"x" * 100  # a is now the most recently used
    store.set("d", b"y" * 100, ttl_s=60)  # evicts b, the least recently used
    assert store.get("b") is None and store.get("a") is not None and len(store) == 3
    store.set("huge", b"z" * 301, ttl_s=60)  # larger than the whole budget: not stored
    assert store.get("huge") is None
    store.set("short", b"s", ttl_s=-1)  # already expired
    assert store.get("short") is None


async def test_memory_cache_frames_features_and_version_invalidation():
    metrics = Metrics()
    cache = Cache(metrics, memory_bytes=1 << 20)
    assert cache.backend == "memory"
    old = cache.frame_key("demo", "1", "default", 5, "full.jpegq90")
    assert await cache.get_frame(old) is None
    await cache.put_frame(old, frame(5))
    assert await cache.get_frame(old) == frame(5)
    assert (lookups(metrics, "frame", "miss"), lookups(metrics, "frame", "hit")) == (1, 1)

    features = np.random.default_rng(0).normal(size=(30, 512)).astype(np.float32)
    key = cache.features_key("ave-abc", "hash")
    await cache.put_features(key, features)
    assert np.array_equal(await cache.get_features(key), features)

    new = cache.frame_key("demo", "2", "default", 5, "full.jpegq90")
    other = cache.frame_key("demo-b", "1", "default", 5, "full.jpegq90")
    await cache.put_frame(new, frame(6))
    await cache.put_frame(other, frame(7))
    assert await cache.model_loaded("demo", "2") == 1  # only demo's version-1 frame goes
    assert await cache.get_frame(old) is None
    assert await cache.get_frame(new) == frame(6) and await cache.get_frame(other) == frame(7)


async def test_zero_ttl_turns_a_kind_off():
    metrics = Metrics()
    cache = Cache(metrics, frame_ttl_s=0)
    key = cache.frame_key("demo", "1", "default", 0, "full.png")
    await cache.put_frame(key, frame())
    assert await cache.get_frame(key) is None
    assert lookups(metrics, "frame", "miss") == 0  # not even looked up


async def test_redis_cache_stores_with_ttl_and_shares_between_instances(redis_server):
    metrics = Metrics()
    cache = Cache(metrics, redis_url=redis_server.url, frame_ttl_s=120, feature_ttl_s=600)
    key = cache.frame_key("demo", "1", "abc", 3, "full.png")
    await cache.put_frame(key, frame(3))
    direct = redis.Redis(host="127.0.0.1", port=redis_server.port)
    assert 0 < direct.pttl(key) <= 120_000
    features = np.ones((9, 512), np.float32)
    fkey = cache.features_key("ave-x", "h")
    await cache.put_features(fkey, features)
    assert 0 < direct.pttl(fkey) <= 600_000

    # Another pod (another Cache on the same Redis) sees both.
    other_metrics = Metrics()
    other = Cache(other_metrics, redis_url=redis_server.url)
    assert await other.get_frame(key) == frame(3)
    assert np.array_equal(await other.get_features(fkey), features)
    assert lookups(other_metrics, "frame", "hit") == 1 and lookups(other_metrics, "features", "hit") == 1
    await cache.close()
    await other.close()
    direct.close()


async def test_redis_version_change_deletes_only_that_models_old_frames(redis_server):
    cache = Cache(Metrics(), redis_url=redis_server.url)
    assert await cache.model_loaded("demo", "1") == 0
    keys = {(m, v, i): cache.frame_key(m, v, "default", i, "full.jpegq90")
            for m, v in (("demo", "1"), ("demo-b", "1")) for i in range(3)}
    for k in keys.values():
        await cache.put_frame(k, frame())
    assert await cache.model_loaded("demo", "1") == 0  # same version: nothing to do
    assert await cache.model_loaded("demo", "2") == 3
    for (model, _, _), k in keys.items():
        assert (await cache.get_frame(k) is None) == (model == "demo")
    await cache.close()


async def test_redis_outage_is_bypassed_counted_and_recovered(redis_server):
    metrics = Metrics()
    cache = Cache(metrics, redis_url=redis_server.url, redis_cooldown_s=0.2)
    key = cache.frame_key("demo", "1", "default", 1, "full.png")
    await cache.put_frame(key, frame(1))
    assert await cache.get_frame(key) == frame(1)

    redis_server.stop()  # Redis goes away mid-run
    assert await cache.get_frame(key) is None  # a miss, not an exception
    await cache.put_frame(key, frame(2))
    assert await cache.get_features(cache.features_key("e", "a")) is None
    assert lookups(metrics, "frame", "error") == 1
    assert metrics.sample("lipsync_cache_bypass_total") >= 3  # the failure, then skipped operations
    assert await cache.model_loaded("demo", "9") == 0

    redis_server.start()  # back on the same port, empty

    async def used_again() -> bool:  # skipped until the cool-down after the failure is over
        await cache.put_frame(key, frame(4))
        return await cache.get_frame(key) == frame(4)

    await wait_until_async(used_again, what="the cache to use Redis again after its cool-down")
    await cache.close()


async def test_a_hung_redis_times_out_into_a_bypass(redis_server):
    metrics = Metrics()
    cache = Cache(metrics, redis_url=redis_server.url, redis_timeout_s=0.1, redis_cooldown_s=0.1)
    key = cache.frame_key("demo", "1", "default", 1, "full.png")
    await cache.put_frame(key, frame(1))
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # alive but not answering: a "slow" Redis
    try:
        assert await cache.get_frame(key) is None
        assert lookups(metrics, "frame", "error") == 1
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)

    async def answered() -> bool:  # skipped until the cool-down is over; the frame was never lost
        return await cache.get_frame(key) == frame(1)

    await wait_until_async(answered, what="the resumed Redis to answer after the cool-down")
    await cache.close()


async def test_a_failing_redis_is_logged_without_its_password(caplog):
    with socket.socket() as probe:  # a port nothing listens on: every call fails
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache = Cache(Metrics(), redis_url=f"redis://:hunter2-secret@127.0.0.1:{port}/0", redis_timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="inference_pod.serving.cache"):
        assert await cache.get_frame(cache.frame_key("demo", "1", "default", 1, "full.png")) is None
    await cache.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"redis://127.0.0.1:{port}/0 failed" in logged
    assert "hunter2" not in logged
