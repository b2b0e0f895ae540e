"""The HTTP gateway (``--http-port``): the replaced service's REST API and WebSocket streaming, with aiohttp.

A second front door to the same ``DataPlane`` as gRPC, on the same event loop, and only a converter: frames,
batches, models, stats, status and the registry listing are the data plane's answers rendered as JSON, keys
are checked by ``data_plane.authenticate``, and every call runs in ``data_plane.request_scope`` under the gRPC
method it corresponds to (GenerateFrame, GenerateBatch, ListModels, ...). So draining, in-flight accounting,
queue limits, latency metrics and error codes are the gRPC service's. Errors are JSON ``{"success": false,
"error": message, "code": GRPC_STATUS}`` with the HTTP status the error class carries. The protocol of /ws
lives in ``websocket``, the OpenAPI document in ``openapi``; docs/HTTP_API.md describes both for clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, web
from prometheus_client import CONTENT_TYPE_LATEST

from inference_pod import __version__
from inference_pod.api.http.live_page import web_routes
from inference_pod.api.http.openapi import openapi_document
from inference_pod.api.http.shapes import (
    error_json,
    field,
    frame_json,
    frame_request,
    parse_json,
    reject_unknown,
)
from inference_pod.api.http.webrtc import WebRtcDoor
from inference_pod.api.http.websocket import WebSocketSession
from inference_pod.errors import (
    InvalidInput,
    ModelNotFound,
    TooLarge,
    Unauthenticated,
    Unavailable,
    echo,
    reply_for,
)
from inference_pod.serving.data_plane import DataPlane
from inference_pod.serving.pipeline import FrameRequest, FrameResult

log = logging.getLogger(__name__)

# Bodies above this are parsed and base64-decoded in the CPU pool: megabytes of JSON would stall every
# other request on the event loop.
OFFLOAD_BYTES = 64 << 10
WS_HEARTBEAT_S = 30.0  # pings find dead peers (a closed laptop) that never send a close frame
WS_CLOSE_TIMEOUT_S = 5.0  # how long a close waits for the peer's reply
SHUTDOWN_TIMEOUT_S = 2.0  # after the server's own grace period: what is still running gets cancelled
# Codes for the errors aiohttp raises itself (no route, wrong method, body too large).
HTTP_ERROR_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                    405: "UNIMPLEMENTED",
                    413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT"}
# A preflight's answer for an allowed origin (the data plane decides which: --allowed-origins).
CORS_PREFLIGHT = {"Access-Control-Allow-Headers": "Content-Type, X-API-Key, Authorization",
                  "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600"}
MISSING_KEY = "an API key is required: send an X-API-Key header or Authorization: Bearer <key>"


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


def error_response(code: str, message: str, status: int,
                   headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="lipsync"'
    return web.json_response(error_json(code, message), status=status, headers=headers)


Handler = Callable[["HttpGateway", web.Request], Awaitable[web.StreamResponse]]


def endpoint(method: str, *, scoped: bool = True) -> Callable[[Handler], Handler]:
    """An API route: the caller's key is checked, then (``scoped``) the call runs in the data plane's request
    scope as gRPC ``method``: refused while draining, counted in flight, timed by outcome."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(self: HttpGateway, request: web.Request) -> web.StreamResponse:
            self.authenticate(request_api_key(request), method)
            if not scoped:
                return await handler(self, request)
            async with self.data_plane.request_scope(method):
                return await handler(self, request)

        return run

    return wrap


class LingeringWebSocket(web.WebSocketResponse):
    """A WebSocket whose close 1009 (a message over --max-message-mb) reaches a peer still sending.

    aiohttp refuses the message from its header, sends the close frame and closes the TCP connection at
    once; the peer, still writing the rest of its message, then gets a reset instead of the close frame. Here
    the connection stays open (the rest of the message is read and dropped: the protocol stops parsing after
    the error) until the peer closes it or WS_CLOSE_TIMEOUT_S passes. Uses aiohttp's private close hook, so
    tests/api/test_gateway.py checks it against the installed aiohttp.
    """

    def _set_code_close_transport(self, code: WSCloseCode) -> None:
        if self._close_code != WSCloseCode.MESSAGE_TOO_BIG:
            super()._set_code_close_transport(code)

    async def linger(self, request: web.Request) -> None:
        """After a 1009: wait for the peer to close the connection (bounded), then close it ourselves."""
        if self.close_code != WSCloseCode.MESSAGE_TOO_BIG or request.transport is None:
            return
        transport = request.transport
        deadline = time.monotonic() + WS_CLOSE_TIMEOUT_S
        while not transport.is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        transport.close()


class HttpGateway:
    """Built, started and stopped by the composition root (inference_pod.app), after in-flight calls end."""

    def __init__(self, data_plane: DataPlane):
        self.data_plane = data_plane
        self.max_body_bytes = data_plane.settings.max_message_mb << 20  # one limit for gRPC, HTTP and WebSocket
        self.port: int | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self.webrtc = WebRtcDoor(data_plane)  # POST /webrtc/offer: sessions over WebRTC
        self._runner: web.AppRunner | None = None
        # The document describes the pod as it runs: API-key security only when keys are configured.
        self._openapi = openapi_document(__version__, data_plane.max_batch_items,
                                         keys_required=data_plane.api_keys.enabled,
                                         health_requires_key=data_plane.health_requires_key)
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
            web.post("/webrtc/offer", self.webrtc_offer),
        ])
        self.app.add_routes(web_routes())  # the live page (gateway_web)

    # -------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> HttpGateway:
        s = self.data_plane.settings
        ssl_context = None
        if s.tls_cert is not None:  # the gRPC port's certificate serves HTTPS and WSS too
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ssl_context.load_cert_chain(s.tls_cert, s.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidInput(f"cannot read the TLS certificate or key: {exc}") from None
        # No access log: a line per frame at 25 fps per stream would drown the pod's log (gRPC logs none).
        # Handlers are cancelled when their client disconnects (aiohttp's default is to let them run on):
        # a 4,096-item batch whose client gave up would otherwise keep the device busy for nobody.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                                     handler_cancellation=True)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, s.host, s.http_port, ssl_context=ssl_context).start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise Unavailable(f"cannot listen on {s.host}:{s.http_port} (HTTP gateway, --http-port): {exc}") from None
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
        await self.webrtc.close()
        await self._runner.cleanup()
        self._runner = None

    # -------------------------------------------------------------------------------------- shared plumbing

    def authenticate(self, key: str | None, method: str) -> None:
        """The data plane's check (which counts a rejection), with the HTTP way of sending a key in the message."""
        try:
            self.data_plane.authenticate(key, method)
        except Unauthenticated as exc:
            raise Unauthenticated(MISSING_KEY if not key and self.data_plane.api_keys.has_keys else str(exc)) from None

    async def in_cpu_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.data_plane.cpu_pool, function, *args)

    async def read_body(self, request: web.Request, parse: Callable[[bytes], object]):
        """The body, parsed by ``parse`` (in the CPU pool when it is large). The size limit is checked on
        the declared length first, so an oversized upload is refused before it is read."""
        declared = request.content_length
        limit = f"the limit is {self.max_body_bytes} bytes (--max-message-mb)"
        if declared is not None and declared > self.max_body_bytes:
            raise TooLarge(f"the request body is {declared} bytes; {limit}")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:  # chunked uploads declare no length
            raise TooLarge(f"the request body is too large; {limit}") from None
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
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = HTTP_ERROR_CODES.get(exc.status, "INTERNAL" if exc.status >= 500 else "INVALID_ARGUMENT")
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(code, _http_error_message(request, exc), exc.status, allow)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reply = reply_for(exc, f"{request.method} {request.path}")
            return error_response(reply.code, reply.message, reply.http_status)

    @web.middleware
    async def _cors_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        allow = self.data_plane.cors_origin(request.headers.get("Origin"), request.host)
        cors = {} if allow is None else {"Access-Control-Allow-Origin": allow}
        if allow not in (None, "*"):
            cors["Vary"] = "Origin"  # the answer differs by origin: caches must not share it
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            # A browser's preflight. Refused by leaving the CORS headers out: the browser then says why.
            return web.Response(status=204, headers={**cors, **CORS_PREFLIGHT} if cors else None)
        response = await handler(request)
        if not response.prepared:  # a WebSocket has sent its headers already
            response.headers.update(cors)
        return response

    # -------------------------------------------------------------------------------------- open routes

    async def health(self, request: web.Request) -> web.Response:
        """For probes and load balancers: 200 only while the pod takes requests. ``?service=NAME`` asks about
        one model, as gRPC Health.Check does: 200 serving (resident), 503 not serving, 404 unknown."""
        reject_unknown(dict(request.query), frozenset({"service"}), "the query")
        service = request.query.get("service", "")
        if not service:
            state = self.data_plane.state()
            return web.json_response({"status": state}, status=200 if state == "healthy" else 503)
        if self.data_plane.health_requires_key:
            try:
                self.authenticate(request_api_key(request), "Health.Check")
            except Unauthenticated as exc:
                raise Unauthenticated(f"{exc} (this pod runs with --health-requires-key: a model's health needs "
                                      "a key)") from None
        serving = self.data_plane.health.model(service)
        if serving is None:
            raise ModelNotFound(f"no model named {echo(service)} on this pod (leave service out for the pod)")
        return web.json_response({"service": service, "status": "serving" if serving else "not_serving"},
                                 status=200 if serving else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The same registry the metrics port serves, for scrapers that only reach this port."""
        return web.Response(body=self.data_plane.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        """Open like gRPC reflection: it describes the API and holds no data."""
        return web.json_response(self._openapi)

    # -------------------------------------------------------------------------------------- server and models

    @endpoint("Status", scoped=False)  # answers while draining too: that is one of the things it reports
    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True, **dataclasses.asdict(await self.data_plane.status())})

    @endpoint("GetStats")
    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True, **dataclasses.asdict(self.data_plane.stats())})

    @endpoint("ListModels")
    async def list_models(self, request: web.Request) -> web.Response:
        models = [dataclasses.asdict(view) for view in await self.data_plane.models()]
        return web.json_response({
            "success": True, "models": models,
            "loaded_models": [m["name"] for m in models if m["state"] == "loaded"],
            "available_models": [m["name"] for m in models if m["state"] == "available"]})

    @endpoint("ListRegistry")
    async def list_registry(self, request: web.Request) -> web.Response:
        listing = await self.data_plane.registry_listing()
        return web.json_response({"success": True, **dataclasses.asdict(listing)})

    @endpoint("LoadModel")
    async def download_model(self, request: web.Request) -> web.Response:
        """The registry's newest (or the given) version of a model, made resident."""
        reject_unknown(dict(request.query), frozenset({"model_name", "version"}), "the query")
        name = request.query.get("model_name")
        if not name:
            raise InvalidInput("model_name is required: POST /models/download?model_name=NAME[&version=VERSION]")
        version = request.query.get("version")
        if version is not None and not version:
            raise InvalidInput("version is empty: give a version, or leave it out for the registry's newest")
        loaded = await self.data_plane.download(name, version)
        model = loaded.model
        return web.json_response({
            "success": True, "model_name": model.name, "version": model.version, "source": loaded.source,
            "downloaded": loaded.source == "registry", "load_time_ms": loaded.load_ms,
            "model": dataclasses.asdict(model)})

    # -------------------------------------------------------------------------------------- frames

    @endpoint("GenerateFrame")
    async def generate_frame(self, request: web.Request) -> web.Response:
        item: FrameRequest = await self.read_body(request, lambda data: frame_request(parse_json(data)))
        return web.json_response(frame_json(await self.data_plane.frame(item)))

    @endpoint("GenerateBatch")
    async def generate_batch(self, request: web.Request) -> web.Response:
        """Items are checked first (a malformed item fails the request: 400 naming it); then each item is
        rendered and fails alone (unknown model, frame past the track, audio that does not decode)."""
        started = time.perf_counter()
        check_size = self.data_plane.check_batch_size
        items: list[FrameRequest] = await self.read_body(request, lambda data: batch_items(data, check_size))
        outcomes = []
        for index, (item, outcome) in enumerate(zip(items, await self.data_plane.batch(items), strict=True)):
            if isinstance(outcome, FrameResult):
                outcomes.append({**frame_json(outcome), "index": index})
            else:
                outcomes.append(error_json(outcome.code, outcome.message, index=index, model_name=item.model,
                                           frame_id=item.frame_id))
        processed = [o for o in outcomes if o["success"]]
        auto_loaded = sorted({o["model_name"] for o in processed if o["auto_loaded"]})
        body = {
            "success": len(processed) == len(outcomes),
            "results": dict(zip(batch_keys(items), outcomes, strict=True)),
            "total_requests": len(outcomes), "processed_count": len(processed),
            "cached_count": sum(o["from_cache"] for o in processed), "failed_count": len(outcomes) - len(processed),
            "auto_loaded_models": auto_loaded, "processing_time_ms": (time.perf_counter() - started) * 1e3}
        text = await self.in_cpu_pool(json.dumps, body)  # possibly megabytes of base64
        return web.Response(text=text, content_type="application/json")

    # -------------------------------------------------------------------------------------- WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """Authenticated at the handshake (header, or ?api_key= from browsers); each message's operation runs
        in the request scope like an HTTP call (see gateway_ws)."""
        self.data_plane.check_origin(request.headers.get("Origin"), request.host)
        key = request_api_key(request, allow_query=True)
        self.authenticate(key, "WebSocket")
        self.data_plane.admit()
        # No per-message compression: frames are JPEG/PNG already, and deflate would cost loop time per frame.
        ws = LingeringWebSocket(max_msg_size=self.max_body_bytes, heartbeat=WS_HEARTBEAT_S,
                                timeout=WS_CLOSE_TIMEOUT_S, compress=False)
        if not ws.can_prepare(request).ok:
            raise InvalidInput("/ws is a WebSocket endpoint: connect with a WebSocket client (ws:// or wss://)")
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            with self.data_plane.connection("websocket"):
                await WebSocketSession(self.data_plane, self.authenticate, ws, key).run()
            await ws.linger(request)
        finally:
            self.sockets.discard(ws)
        return ws


    # -------------------------------------------------------------------------------------- WebRTC

    async def webrtc_offer(self, request: web.Request) -> web.Response:
        """A live session over WebRTC (see webrtc): the answer comes once the session has started, so a pod at
        --max-sessions refuses with 429 and the words of every other door."""
        self.data_plane.check_origin(request.headers.get("Origin"), request.host)
        self.authenticate(request_api_key(request), "Session")
        self.data_plane.admit()
        body = await self.read_body(request, parse_json)
        return web.json_response(await self.webrtc.answer(body))


# ------------------------------------------------------------------------------------------ helpers


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path} (the API is described at /openapi.json)"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
    return exc.text or exc.reason


def batch_items(data: bytes, check_size: Callable[[int], None]) -> list[FrameRequest]:
    """The batch's items, each checked as a frame request; the first malformed one fails the request."""
    obj = parse_json(data)
    reject_unknown(obj, frozenset({"requests"}), "a batch request")
    raw_items = field(obj, "requests", list)
    check_size(len(raw_items))
    items = []
    for index, raw in enumerate(raw_items):
        what = f"requests[{index}]"
        if not isinstance(raw, dict):
            raise InvalidInput(f"{what} must be a JSON object")
        try:
            items.append(frame_request(raw, what=what))
        except InvalidInput as exc:
            raise InvalidInput(f"{what}: {exc}") from None
    return items


def batch_keys(items: list[FrameRequest]) -> list[str]:
    """``{model}_{frame}`` per item, as the replaced service keyed them; repeats get ``#2``, ``#3``...
    (``#`` is never in a model name)."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    for item in items:
        base = f"{item.model}_{item.frame_id}"
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys
