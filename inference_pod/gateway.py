"""The HTTP gateway (``--http-port``): the replaced service's REST API and WebSocket streaming, with aiohttp.

A second front door to the same ``LipSyncServer`` as gRPC, on the same event loop: frames come from
``server.pipeline``, models from ``server.store``, keys are checked by ``server.authenticate``, and every
call runs in ``server.request_scope`` under the gRPC method it corresponds to (GenerateFrame, GenerateBatch,
ListModels, ...). So draining, in-flight accounting, queue limits, latency metrics and error codes are the
gRPC service's. Errors are JSON ``{"success": false, "error": message, "code": GRPC_STATUS}`` with the HTTP
status ``errors.HTTP_STATUS`` gives that code. The protocol of /ws lives in ``gateway_ws``, the OpenAPI
document in ``openapi``; docs/HTTP_API.md describes both for clients.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, web
from prometheus_client import CONTENT_TYPE_LATEST

from inference_pod import __version__
from inference_pod.errors import HTTP_STATUS, InvalidInput, LipSyncError, Unauthenticated, Unavailable
from inference_pod.gateway_json import (
    FrameRequest,
    error_json,
    field,
    frame_json,
    frame_request,
    message_dict,
    parse_json,
    reject_unknown,
)
from inference_pod.gateway_web import web_routes
from inference_pod.gateway_ws import WebSocketSession
from inference_pod.model_store import check_model_name
from inference_pod.openapi import openapi_document
from inference_pod.server import (
    MAX_BATCH_ITEMS,
    LipSyncServer,
    batch_concurrency,
    loaded_info,
    model_infos,
    stats_message,
)

log = logging.getLogger(__name__)

# Bodies above this are parsed and base64-decoded in the CPU pool: megabytes of JSON would stall every
# other request on the event loop.
OFFLOAD_BYTES = 64 << 10
WS_HEARTBEAT_S = 30.0  # pings find dead peers (a closed laptop) that never send a close frame
WS_CLOSE_TIMEOUT_S = 5.0  # how long a close waits for the peer's reply
SHUTDOWN_TIMEOUT_S = 2.0  # after the server's own grace period: what is still running gets cancelled
# Codes for the errors aiohttp raises itself (no route, wrong method, body too large).
HTTP_ERROR_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
                    413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT"}
# API keys travel in headers, never cookies, so any origin may call: browsers need these to allow it.
CORS_HEADERS = {"Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Headers": "Content-Type, X-API-Key, Authorization",
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600"}
MISSING_KEY = "an API key is required: send an X-API-Key header or Authorization: Bearer <key>"


class BodyTooLarge(LipSyncError):
    """A body or message over --max-message-mb: what gRPC answers RESOURCE_EXHAUSTED, as HTTP 413."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 413


def request_api_key(request: web.Request, allow_query: bool = False) -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    if allow_query:  # browsers cannot set headers on a WebSocket handshake
        return request.query.get("api_key")
    return None


def error_response(code: str, message: str, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="lipsync"'
    return web.json_response(error_json(code, message), status=status or HTTP_STATUS.get(code, 500),
                             headers=headers)


Handler = Callable[["HttpGateway", web.Request], Awaitable[web.StreamResponse]]


def endpoint(method: str, *, scoped: bool = True) -> Callable[[Handler], Handler]:
    """An API route: the caller's key is checked, then (``scoped``) the call runs in the server's request
    scope as gRPC ``method``: refused while draining, counted in flight, timed by outcome."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(self: HttpGateway, request: web.Request) -> web.StreamResponse:
            self.authenticate(request_api_key(request), method)
            if not scoped:
                return await handler(self, request)
            async with self.server.request_scope(method):
                return await handler(self, request)

        return run

    return wrap


class HttpGateway:
    """Build with the server, ``await start()``; the server stops it after its in-flight calls are done."""

    def __init__(self, server: LipSyncServer):
        self.server = server
        self.pipeline = server.pipeline
        self.store = server.store
        self.max_body_bytes = server.settings.max_message_mb << 20  # one limit for gRPC, HTTP and WebSocket
        self.port: int | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._openapi = openapi_document(__version__, MAX_BATCH_ITEMS)
        self.app = web.Application(client_max_size=self.max_body_bytes,
                                   middlewares=[self._cors_middleware, self._error_middleware])
        self.app.add_routes([
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
            web.get("/status", self.status),
            web.get("/stats", self.stats),
            web.get("/models", self.list_models),
            web.get("/models/registry", self.list_registry),
            web.post("/models/download", self.download_model),
            web.post("/generate/frame", self.generate_frame),
            web.post("/generate/batch", self.generate_batch),
            web.get("/ws", self.websocket),
        ])
        self.app.add_routes(web_routes())  # the live page (gateway_web)

    # -------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> HttpGateway:
        s = self.server.settings
        ssl_context = None
        if s.tls_cert is not None:  # the gRPC port's certificate serves HTTPS and WSS too
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ssl_context.load_cert_chain(s.tls_cert, s.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidInput(f"cannot read the TLS certificate or key: {exc}") from None
        # No access log: a line per frame at 25 fps per stream would drown the pod's log (gRPC logs none).
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, s.host, s.http_port, ssl_context=ssl_context).start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise Unavailable(f"cannot listen on {s.host}:{s.http_port} (HTTP gateway): {exc}") from None
        self.port = self._runner.addresses[0][1]
        log.info("HTTP gateway on %s://%s:%d", "https" if ssl_context else "http", s.host, self.port)
        return self

    async def stop(self) -> None:
        """Close WebSockets (1001 going away) and stop listening. The server calls this once its in-flight
        calls, HTTP ones included, are done or out of grace."""
        if self._runner is None:
            return
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                               for ws in list(self.sockets)), return_exceptions=True)
        await self._runner.cleanup()
        self._runner = None

    # -------------------------------------------------------------------------------------- shared plumbing

    def authenticate(self, key: str | None, method: str) -> None:
        try:
            self.server.authenticate(key)
        except Unauthenticated as exc:
            self.count_rejected(method)
            raise Unauthenticated(MISSING_KEY if not key else str(exc)) from None

    def count_rejected(self, method: str) -> None:
        self.server.metrics.request_duration.labels(method=method, code="UNAUTHENTICATED").observe(0)

    def state(self) -> str:
        if self.server.draining:
            return "draining"
        return "healthy" if self.server.ready else "starting"

    def is_resident(self, name: str) -> bool:
        return any(m.name == name for m in self.store.resident)

    async def in_cpu_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.server.cpu_pool, function, *args)

    async def read_body(self, request: web.Request, parse: Callable[[bytes], object]):
        """The body, parsed by ``parse`` (in the CPU pool when it is large). The size limit is checked on
        the declared length first, so an oversized upload is refused before it is read."""
        declared = request.content_length
        limit = f"the limit is {self.max_body_bytes} bytes (--max-message-mb)"
        if declared is not None and declared > self.max_body_bytes:
            raise BodyTooLarge(f"the request body is {declared} bytes; {limit}")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:  # chunked uploads declare no length
            raise BodyTooLarge(f"the request body is too large; {limit}") from None
        if not data.strip():
            raise InvalidInput("the request body is empty: send a JSON object")
        if len(data) > OFFLOAD_BYTES:
            return await self.in_cpu_pool(parse, data)
        return parse(data)

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure becomes a JSON error; nothing a client sends reaches the client as a traceback."""
        try:
            return await handler(request)
        except LipSyncError as exc:
            return error_response(exc.grpc_status, str(exc), getattr(exc, "http_status", None))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = HTTP_ERROR_CODES.get(exc.status, "INTERNAL" if exc.status >= 500 else "INVALID_ARGUMENT")
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(code, _http_error_message(request, exc), exc.status, allow)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return error_response("INTERNAL", f"internal error: {type(exc).__name__}: {exc}")

    @web.middleware
    async def _cors_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers=CORS_HEADERS)  # a browser's preflight
        response = await handler(request)
        if not response.prepared:  # a WebSocket has sent its headers already
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    # -------------------------------------------------------------------------------------- open routes

    async def health(self, request: web.Request) -> web.Response:
        """For probes and load balancers: 200 only while the pod takes requests."""
        state = self.state()
        return web.json_response({"status": state}, status=200 if state == "healthy" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The same registry the metrics port serves, for scrapers that only reach this port."""
        return web.Response(body=self.server.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        """Open like gRPC reflection: it describes the API and holds no data."""
        return web.json_response(self._openapi)

    # -------------------------------------------------------------------------------------- server and models

    @endpoint("Status", scoped=False)  # answers while draining too: that is one of the things it reports
    async def status(self, request: web.Request) -> web.Response:
        server, s = self.server, self.server.settings
        return web.json_response({
            "success": True, "status": self.state(), "server_version": __version__,
            "uptime_seconds": time.monotonic() - server.started_at, "draining": server.draining,
            "device": s.device, "precision": s.precision, "max_batch": s.max_batch,
            "inflight_requests": server.inflight,
            "models_resident": sorted(m.name for m in self.store.resident),
            "models_available": sorted(self.store.local_packages()),
            "cache_backend": server.cache.backend, "registry_url": server.registry.url if server.registry else None,
            "api_keys_required": server.api_keys.enabled, "websocket_connections": len(self.sockets),
            "ports": {"grpc": server.port, "http": self.port, "metrics": s.metrics_port or None},
        })

    @endpoint("GetStats")
    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True, **message_dict(stats_message(self.server))})

    @endpoint("ListModels")
    async def list_models(self, request: web.Request) -> web.Response:
        models = [message_dict(info) for info in model_infos(self.store)]
        return web.json_response({
            "success": True, "models": models,
            "loaded_models": [m["name"] for m in models if m["state"] == "loaded"],
            "available_models": [m["name"] for m in models if m["state"] == "available"]})

    @endpoint("ListRegistry")
    async def list_registry(self, request: web.Request) -> web.Response:
        registry = self._registry()
        entries = await asyncio.to_thread(registry.list, True)
        return web.json_response({"success": True, "registry_url": registry.url, "packages": [
            {"name": e.name, "version": e.version, "size": e.size, "sha256": e.sha256,
             "url": registry.package_url(e)} for e in entries]})

    @endpoint("LoadModel")
    async def download_model(self, request: web.Request) -> web.Response:
        """The registry's newest (or the given) version of a model, made resident. A version already on
        local disk is not downloaded again: ``source`` says where it came from."""
        name = request.query.get("model_name")
        if not name:
            raise InvalidInput("model_name is required: POST /models/download?model_name=NAME[&version=VERSION]")
        check_model_name(name)
        version = request.query.get("version") or None
        if version:
            check_model_name(version, "model version")
        registry = self._registry()
        entry = await asyncio.to_thread(registry.resolve, name, version)
        model, source, seconds = await self.store.load(name, entry.version)
        return web.json_response({
            "success": True, "model_name": model.name, "version": model.version, "source": source,
            "downloaded": source == "registry", "load_time_ms": seconds * 1e3,
            "model": message_dict(loaded_info(model))})

    def _registry(self):
        if self.server.registry is None:
            raise Unavailable("no model registry is configured on this server (--registry-url)")
        return self.server.registry

    # -------------------------------------------------------------------------------------- frames

    @endpoint("GenerateFrame")
    async def generate_frame(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        item: FrameRequest = await self.read_body(request, lambda data: frame_request(parse_json(data)))
        auto_loaded = not self.is_resident(item.model_name)
        result = await self.pipeline.frame(item.model_name, item.frame_id, item.audio, item.output)
        return web.json_response(frame_json(result, processing_ms=(time.perf_counter() - started) * 1e3,
                                            auto_loaded=auto_loaded))

    @endpoint("GenerateBatch")
    async def generate_batch(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        raw_items, items = await self.read_body(request, _batch_items)
        resident_before = {m.name for m in self.store.resident}
        limit = asyncio.Semaphore(batch_concurrency(self.server.settings))

        async def one(index: int, item: FrameRequest | LipSyncError) -> dict:
            if isinstance(item, LipSyncError):
                return _item_error(index, raw_items[index], item.grpc_status, str(item))
            async with limit:
                try:
                    result = await self.pipeline.frame(item.model_name, item.frame_id, item.audio, item.output)
                except Exception as exc:  # each item fails alone
                    code = exc.grpc_status if isinstance(exc, LipSyncError) else "INTERNAL"
                    if code == "INTERNAL":
                        log.exception("batch item %d failed", index)
                    return _item_error(index, raw_items[index], code, str(exc))
            return {**frame_json(result, processing_ms=result.timings.total_s * 1e3,
                                 auto_loaded=item.model_name not in resident_before), "index": index}

        outcomes = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        processed = [o for o in outcomes if o["success"]]
        auto_loaded = sorted({o["model_name"] for o in processed if o["auto_loaded"]})
        body = {
            "success": len(processed) == len(outcomes),
            "results": dict(zip(batch_keys(raw_items), outcomes, strict=True)),
            "total_requests": len(outcomes), "processed_count": len(processed),
            "cached_count": sum(o["from_cache"] for o in processed), "failed_count": len(outcomes) - len(processed),
            "auto_loaded_models": auto_loaded, "processing_time_ms": (time.perf_counter() - started) * 1e3}
        text = await self.in_cpu_pool(json.dumps, body)  # possibly megabytes of base64
        return web.Response(text=text, content_type="application/json")

    # -------------------------------------------------------------------------------------- WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """Authenticated at the handshake (header, or ?api_key= from browsers); each message's operation runs
        in the request scope like an HTTP call (see gateway_ws)."""
        key = request_api_key(request, allow_query=True)
        self.authenticate(key, "WebSocket")
        if self.server.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        # No per-message compression: frames are JPEG/PNG already, and deflate would cost loop time per frame.
        ws = web.WebSocketResponse(max_msg_size=self.max_body_bytes, heartbeat=WS_HEARTBEAT_S,
                                   timeout=WS_CLOSE_TIMEOUT_S, compress=False)
        if not ws.can_prepare(request).ok:
            raise InvalidInput("/ws is a WebSocket endpoint: connect with a WebSocket client (ws:// or wss://)")
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            await WebSocketSession(self, ws, key).run()
        finally:
            self.sockets.discard(ws)
        return ws


# ------------------------------------------------------------------------------------------ helpers


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path} (the API is described at /openapi.json)"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
    return exc.text or exc.reason


def _batch_items(data: bytes) -> tuple[list, list[FrameRequest | LipSyncError]]:
    """The raw items (for result keys) and each one parsed, or the error that item alone fails with."""
    obj = parse_json(data)
    reject_unknown(obj, frozenset({"requests"}), "a batch request")
    raw_items = field(obj, "requests", list)
    if len(raw_items) > MAX_BATCH_ITEMS:
        raise InvalidInput(f"a batch holds at most {MAX_BATCH_ITEMS} requests, got {len(raw_items)}")
    items: list[FrameRequest | LipSyncError] = []
    for index, raw in enumerate(raw_items):
        try:
            if not isinstance(raw, dict):
                raise InvalidInput(f"requests[{index}] must be a JSON object")
            items.append(frame_request(raw, what=f"requests[{index}]"))
        except LipSyncError as exc:
            items.append(exc)
    return raw_items, items


def batch_keys(raw_items: list) -> list[str]:
    """``{model}_{frame}`` per item, as the replaced service keyed them; an item without a usable model name
    and frame id is ``item_{index}``; repeats get ``#2``, ``#3``... (``#`` is never in a model name)."""
    keys, seen = [], {}
    for index, raw in enumerate(raw_items):
        model = raw.get("model_name") if isinstance(raw, dict) else None
        frame = raw.get("frame_id") if isinstance(raw, dict) else None
        base = f"{model}_{frame}" if isinstance(model, str) and type(frame) is int else f"item_{index}"
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys


def _item_error(index: int, raw, code: str, message: str) -> dict:
    model = raw.get("model_name") if isinstance(raw, dict) else None
    frame = raw.get("frame_id") if isinstance(raw, dict) else None
    return error_json(code, message, index=index, model_name=model if isinstance(model, str) else None,
                      frame_id=frame if type(frame) is int else None)
