"""Frame and audio-feature caches: Redis when configured, else an in-process LRU.

Keys (``prefix`` defaults to ``lipsync:``; names and versions are identifiers, so ``:`` cannot appear):

    {prefix}frame:{model}:{version}:{audio}:{frame_id}:{output}   an encoded frame and its metadata
    {prefix}features:{encoder}:{audio}                             padded features of an audio track
    {prefix}model-version:{model}                                  the version last served, for invalidation

``audio`` is the request audio's hash (or ``default`` for the package's own track, which the model
version already pins); ``encoder`` names the audio mode and the encoder weights' sha256, so features are
shared by every model with the same encoder. A model loading under a new version deletes its old frames.

The cache is an optimisation and never a dependency: a Redis error or timeout turns into a miss, counted in
``lipsync_cache_requests_total{result="error"}`` and ``lipsync_cache_bypass_total``, and after a failure
Redis is left alone for a short cool-down so a dead server costs one timeout, not one per request.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import numpy as np

from inference_pod.serving.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "lipsync:"
REDIS_TIMEOUT_S = 0.25
REDIS_COOLDOWN_S = 2.0
FEATURES_L1_BYTES = 64 << 20  # features are looked up per request; keep recent ones next to the engine


@dataclass(frozen=True)
class CachedFrame:
    """An encoded frame with what a response needs besides the image."""

    image: bytes
    width: int
    height: int
    template_id: int
    crop_box: tuple[int, int, int, int, int]  # x1, y1, x2, y2, size

    _HEADER = struct.Struct("<4sII i 5i")
    _MAGIC = b"LSF1"

    def to_bytes(self) -> bytes:
        return self._HEADER.pack(self._MAGIC, self.width, self.height, self.template_id, *self.crop_box) + self.image

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedFrame:
        size = cls._HEADER.size
        if len(data) < size:
            raise ValueError("cached frame is truncated")
        magic, width, height, template_id, *box = cls._HEADER.unpack_from(data)
        if magic != cls._MAGIC:
            raise ValueError("cached frame has an unknown layout")
        return cls(image=bytes(data[size:]), width=width, height=height, template_id=template_id,
                   crop_box=tuple(box))


def features_to_bytes(features: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def features_from_bytes(data: bytes) -> np.ndarray:
    features = np.load(io.BytesIO(data), allow_pickle=False)
    if features.dtype != np.float32 or features.ndim != 2:
        raise ValueError(f"cached features have dtype {features.dtype} and shape {features.shape}")
    return features


# ------------------------------------------------------------------------------------------ backends


class MemoryStore:
    """A byte-bounded LRU with per-entry expiry. Thread-safe, never fails."""

    name = "memory"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            value, expires = item
            if expires <= time.monotonic():
                self._remove(key)
                return None
            self._items.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._remove(key)
            self._items[key] = (value, time.monotonic() + ttl_s)
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._items)))

    def delete_matching(self, prefix: str, keep: str | None = None) -> int:
        with self._lock:
            doomed = [k for k in self._items if k.startswith(prefix) and not (keep and k.startswith(keep))]
            for key in doomed:
                self._remove(key)
            return len(doomed)

    def _remove(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self._bytes -= len(value)

    def __len__(self) -> int:
        return len(self._items)


class RedisStore:
    """redis.asyncio with short timeouts and no client-side retries: the cache's caller handles failure."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float = REDIS_TIMEOUT_S):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        # what logs show: never the password a chart-made URL carries (redis://:PASSWORD@host:port/db)
        parts = urlsplit(url)
        self.display_url = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        self.timeout_s = timeout_s
        self._client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            max_connections=256,
        )

    # Socket timeouts bound each read and connect; wait_for also bounds waiting for a pooled connection.
    # Replies are bytes: the client is made without decode_responses (the stubs cannot know that).
    async def get(self, key: str) -> bytes | None:
        return cast("bytes | None", await asyncio.wait_for(self._client.get(key), self.timeout_s * 2))

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await asyncio.wait_for(self._client.set(key, value, px=max(1, int(ttl_s * 1000))), self.timeout_s * 2)

    async def get_set(self, key: str, value: str) -> bytes | None:
        return cast("bytes | None", await asyncio.wait_for(self._client.getset(key, value), self.timeout_s * 2))

    async def delete_matching(self, prefix: str, keep: str | None = None) -> int:
        """SCAN (never KEYS: it blocks Redis) and UNLINK in batches."""
        deleted = 0
        batch: list[bytes] = []
        async for key in self._client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            if keep and key.decode().startswith(keep):
                continue
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await self._client.unlink(*batch)
                batch = []
        if batch:
            deleted += await self._client.unlink(*batch)
        return deleted

    async def close(self) -> None:
        await self._client.aclose()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# ------------------------------------------------------------------------------------------ the cache


class Cache:
    """Frame and feature cache over a MemoryStore or a RedisStore; errors become counted misses."""

    def __init__(self, metrics: Metrics, *, redis_url: str = "", frame_ttl_s: float = 3600.0,
                 feature_ttl_s: float = 86400.0, memory_bytes: int = 256 << 20, prefix: str = DEFAULT_PREFIX,
                 redis_timeout_s: float = REDIS_TIMEOUT_S, redis_cooldown_s: float = REDIS_COOLDOWN_S):
        self.metrics = metrics
        self.frame_ttl_s = frame_ttl_s
        self.feature_ttl_s = feature_ttl_s
        self.prefix = prefix
        self.redis_cooldown_s = redis_cooldown_s
        self._redis = RedisStore(redis_url, redis_timeout_s) if redis_url else None
        self._memory = MemoryStore(memory_bytes) if self._redis is None else None
        # With Redis, recent features also stay in process: every request with audio looks them up.
        self._features_l1 = MemoryStore(FEATURES_L1_BYTES)
        self._redis_down_until = 0.0

    @property
    def backend(self) -> str:
        return "redis" if self._redis is not None else "memory"

    @property
    def redis_display_url(self) -> str | None:
        """The Redis this cache uses, as people may see it (no password), or None for the in-process cache."""
        return self._redis.display_url if self._redis is not None else None

    # -------------------------------------------------------------------------------------- keys

    def frame_key(self, model: str, version: str, audio_id: str, frame_id: int, output_key: str) -> str:
        return f"{self.prefix}frame:{model}:{version}:{audio_id}:{frame_id}:{output_key}"

    def features_key(self, encoder_id: str, audio_id: str) -> str:
        return f"{self.prefix}features:{encoder_id}:{audio_id}"

    # -------------------------------------------------------------------------------------- frames

    async def get_frame(self, key: str) -> CachedFrame | None:
        if self.frame_ttl_s <= 0:
            return None
        data = await self._get("frame", key)
        if data is None:
            return None
        try:
            return CachedFrame.from_bytes(data)
        except ValueError as exc:
            log.warning("ignoring a corrupt cached frame %s: %s", key, exc)
            return None

    async def put_frame(self, key: str, frame: CachedFrame) -> None:
        if self.frame_ttl_s > 0:
            await self._set(key, frame.to_bytes(), self.frame_ttl_s)

    # -------------------------------------------------------------------------------------- features

    async def get_features(self, key: str) -> np.ndarray | None:
        if self.feature_ttl_s <= 0:
            return None
        data = self._features_l1.get(key)
        if data is not None:
            self.metrics.cache_requests.labels(kind="features", result="hit").inc()
        else:
            data = await self._get("features", key)
            if data is None:
                return None
            self._features_l1.set(key, data, self.feature_ttl_s)
        try:
            return features_from_bytes(data)
        except ValueError as exc:
            log.warning("ignoring corrupt cached features %s: %s", key, exc)
            return None

    async def put_features(self, key: str, features: np.ndarray) -> None:
        if self.feature_ttl_s > 0:
            data = features_to_bytes(features)
            self._features_l1.set(key, data, self.feature_ttl_s)
            await self._set(key, data, self.feature_ttl_s)

    # -------------------------------------------------------------------------------------- models

    async def model_loaded(self, model: str, version: str) -> int:
        """Record the version now served; frames of any other version of ``model`` are deleted."""
        marker = f"{self.prefix}model-version:{model}"
        frames = f"{self.prefix}frame:{model}:"
        if self._memory is not None:
            return self._memory.delete_matching(frames, keep=f"{frames}{version}:")
        redis = self._usable_redis()
        if redis is None:
            return 0
        try:
            previous = await redis.get_set(marker, version)
            if previous is None or previous.decode() == version:
                return 0
            deleted = await redis.delete_matching(frames, keep=f"{frames}{version}:")
        except Exception as exc:  # any Redis failure means: skip the cache
            self._redis_failed(exc)
            return 0
        log.info("model %s changed version %s -> %s: %d cached frames deleted", model, previous.decode(),
                 version, deleted)
        return deleted

    # -------------------------------------------------------------------------------------- plumbing

    async def _get(self, kind: str, key: str) -> bytes | None:
        if self._memory is not None:
            data = self._memory.get(key)
        elif (redis := self._usable_redis()) is None:
            self.metrics.cache_bypass.inc()
            return None
        else:
            try:
                data = await redis.get(key)
            except Exception as exc:  # refused, timeout, protocol: all bypass
                self._redis_failed(exc)
                self.metrics.cache_requests.labels(kind=kind, result="error").inc()
                return None
        self.metrics.cache_requests.labels(kind=kind, result="hit" if data is not None else "miss").inc()
        return data

    async def _set(self, key: str, value: bytes, ttl_s: float) -> None:
        if self._memory is not None:
            self._memory.set(key, value, ttl_s)
            return
        redis = self._usable_redis()
        if redis is None:
            self.metrics.cache_bypass.inc()
            return
        try:
            await redis.set(key, value, ttl_s)
        except Exception as exc:
            self._redis_failed(exc)

    def _usable_redis(self) -> RedisStore | None:
        """The Redis store, unless there is none or it failed within the cool-down."""
        return self._redis if time.monotonic() >= self._redis_down_until else None

    def _redis_failed(self, exc: BaseException) -> None:
        self.metrics.cache_bypass.inc()
        if (redis := self._usable_redis()) is not None:  # the first failure of a spell is logged
            log.warning("Redis %s failed (%s: %s); bypassing the cache for %.1fs", redis.display_url,
                        type(exc).__name__, exc, self.redis_cooldown_s)
        self._redis_down_until = time.monotonic() + self.redis_cooldown_s

    def stats(self) -> dict[str, int]:
        def total(result: str) -> int:
            return int(sum(self.metrics.sample("lipsync_cache_requests_total", {"kind": k, "result": result})
                           for k in ("frame", "features")))

        return {"hits": total("hit"), "misses": total("miss"), "errors": total("error"),
                "bypassed": int(self.metrics.sample("lipsync_cache_bypass_total"))}

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
