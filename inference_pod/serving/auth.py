"""API keys: a file of accepted keys, checked on every call except health checks and reflection.

A key comes in the ``x-api-key`` metadata or as ``authorization: Bearer <key>``. The file holds one key per
line (``#`` comments and blank lines ignored) and is re-read when it changes, so a rotated Kubernetes
Secret takes effect without a restart. Keys are compared as SHA-256 digests in constant time.

An empty file means what it says: no key is accepted. At start that is refused (one line: the pod would
serve nobody); a file emptied while running is logged as an error and every call is refused until keys are
back (fail closed). A file that cannot be read while running (a Secret mid-rotation) keeps the last keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from inference_pod.errors import InvalidInput, Unauthenticated

log = logging.getLogger(__name__)

# Probes and tooling must work without a key.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
RELOAD_CHECK_S = 2.0
MISSING_KEY = "an API key is required: send x-api-key metadata or authorization: Bearer <key>"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class ApiKeys:
    """The accepted keys, from a file (reloaded on change) or a fixed list."""

    def __init__(self, path: Path | None = None, keys: Iterable[str] = ()):
        self.path = Path(path) if path is not None else None
        self._digests: list[bytes] = [_digest(k) for k in keys]
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self._digests)

    @property
    def has_keys(self) -> bool:
        """False when enabled with an emptied file: then every call is refused."""
        return bool(self._digests)

    def _reload(self, force: bool = False) -> None:
        if self.path is None:  # a fixed list
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if force:
                raise InvalidInput(f"API keys file {self.path} cannot be read: {exc}") from None
            log.error("API keys file %s cannot be read (%s); keeping the previous keys", self.path, exc)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            keys = parse_keys(self.path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            if force:
                raise InvalidInput(f"API keys file {self.path} cannot be read: {exc}") from None
            log.error("API keys file %s cannot be read (%s); keeping the previous keys", self.path, exc)
            return
        if not keys and force:
            raise InvalidInput(f"API keys file {self.path} holds no keys: add one key per line, or leave "
                               "--api-keys-file unset to serve without keys")
        self._digests = [_digest(k) for k in keys]
        self._stamp = stamp
        if keys:
            log.info("loaded %d API key(s) from %s", len(keys), self.path)
        else:
            log.error("API keys file %s is now empty: every call is refused until keys are added", self.path)

    def check(self, key: str | None) -> None:
        """Raise Unauthenticated unless ``key`` is accepted (always accepted when keys are not enabled)."""
        if not self.enabled:
            return
        if self.path is not None and time.monotonic() - self._checked > RELOAD_CHECK_S:
            with self._lock:
                self._checked = time.monotonic()
                self._reload()
        if not self._digests:
            raise Unauthenticated("the server's API keys file holds no keys: every call is refused until an "
                                  "operator adds keys")
        if not key:
            raise Unauthenticated(MISSING_KEY)
        candidate = _digest(key)
        # Compare with every key (no early exit), so timing does not tell how many keys were tried.
        accepted = False
        for digest in self._digests:
            accepted |= hmac.compare_digest(candidate, digest)
        if not accepted:
            raise Unauthenticated("the API key is not valid")


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for name, value in metadata or ():
        name = name.lower()
        if isinstance(value, bytes):
            continue
        if name == "x-api-key":
            return value.strip()
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator, as streaming handlers are

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks the key of every call but health checks and reflection with ``authenticate(key, method)``
    (the pod's, which also counts rejections), and answers UNAUTHENTICATED without running the method."""

    def __init__(self, keys: ApiKeys, authenticate: Callable[[str | None, str], None]):
        self.keys = keys
        self._authenticate = authenticate

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.keys.enabled or method.startswith(OPEN_PREFIXES):
            return handler
        try:
            self._authenticate(key_from_metadata(handler_call_details.invocation_metadata),
                               method.rsplit("/", 1)[-1])
        except Unauthenticated as exc:
            return _rejecting_handler(handler, str(exc))
        return handler
