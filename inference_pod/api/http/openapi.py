"""The gateway's OpenAPI 3.1 document (served at /openapi.json): every route, body and error, and the /ws
messages as schemas (OpenAPI has no WebSocket model, so they are listed under ``x-websocket-messages``).

Schemas are JSON Schema 2020-12, as OpenAPI 3.1 uses, so clients and the tests validate real responses
against them with any JSON Schema library.
"""

from __future__ import annotations

from typing import Any

from inference_pod.api.http.shapes import MAX_FRAME_ID
from inference_pod.core.encoding import FORMATS, REGIONS
from inference_pod.registry_index import IDENTIFIER

ERROR_CODES = ["INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
               "UNAVAILABLE", "UNIMPLEMENTED", "INTERNAL"]
# Model names and versions: the validator's own pattern (package.IDENTIFIER), so the schema accepts exactly
# what the server does. ECMA-262's ``$`` matches only at the very end, as ``fullmatch`` does.
NAME = {"type": "string", "pattern": f"^{IDENTIFIER.pattern}$", "minLength": 1, "maxLength": 63}
# A health check's service: a model name, or empty for the pod itself (as gRPC Health's service "").
SERVICE = {"type": "string", "pattern": f"^({IDENTIFIER.pattern})?$", "maxLength": 63}
# Standard base64, or a data: URL of it; never empty (leave the field out instead). The server also accepts
# line breaks inside (what MIME encoders write); the schema states the canonical form.
BASE64_TEXT = r"^(data:[^,]*;base64,)?([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
ERROR_STATUSES = {
    "400": "Bad input: JSON, field types, model name, frame id, audio, output options (code INVALID_ARGUMENT)",
    "401": "No valid API key (code UNAUTHENTICATED)",
    "403": "A WebSocket handshake or WebRTC offer from a web page whose origin this pod does not allow "
           "(--allowed-origins)",
    "404": "Unknown model (code NOT_FOUND)",
    "409": "The server is not set up for this: no model registry is configured (code FAILED_PRECONDITION)",
    "413": "Body over --max-message-mb (code RESOURCE_EXHAUSTED)",
    "429": "The model's queue is full, or (a session) the pod runs --max-sessions already: back off and retry, "
           "or try another pod (code RESOURCE_EXHAUSTED)",
    "500": "A bug (code INTERNAL)",
    "507": "The pod's disk is full: a model could not be downloaded or extracted (code RESOURCE_EXHAUSTED)",
    "503": "Draining, or the registry cannot be reached (code UNAVAILABLE)",
}
OPEN: list = []  # security requirement of the routes that need no key
# A WebSocket opening handshake (RFC 6455): what makes GET /ws a valid request. Without it the route answers
# 400, as for any invalid request; WebSocket clients send these headers themselves.
WEBSOCKET_HANDSHAKE = [
    {"name": "Upgrade", "in": "header", "required": True, "schema": {"type": "string", "enum": ["websocket"]}},
    {"name": "Connection", "in": "header", "required": True, "schema": {"type": "string", "enum": ["Upgrade"]}},
    {"name": "Sec-WebSocket-Version", "in": "header", "required": True, "schema": {"type": "string", "enum": ["13"]}},
    {"name": "Sec-WebSocket-Key", "in": "header", "required": True, "description": "16 random bytes, base64",
     "schema": {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"}},
    {"name": "Origin", "in": "header", "required": False,
     "description": "sent by browsers: the page's origin, which must be this pod's own or one of --allowed-origins "
                    "(403 otherwise); clients that are not browsers leave it out",
     "schema": {"type": "string"}},
]


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict, required: list[str] | None = None, *, closed: bool = False, **extra) -> dict:
    """An object schema; requests are ``closed`` (unknown fields are refused), responses stay open so that
    fields can be added."""
    schema = {"type": "object", "properties": properties, "required": list(properties) if required is None
              else required, **extra}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _int(description: str = "", **extra) -> dict:
    """An integer; request fields that may be left out also take null (JSON null counts as absent)."""
    return {"type": "integer", **({"description": description} if description else {}), **extra}


def _num(description: str = "") -> dict:
    return {"type": "number", **({"description": description} if description else {})}


def _str(description: str = "", **extra) -> dict:
    return {"type": "string", **({"description": description} if description else {}), **extra}


BOOL = {"type": "boolean"}
BASE64 = {"type": "string", "contentEncoding": "base64"}
AUDIO_BASE64 = {**BASE64, "minLength": 4, "pattern": BASE64_TEXT}


def _schemas(max_batch_items: int) -> dict[str, Any]:
    output_fields = {
        "format": {"type": ["string", "null"], "enum": [*FORMATS, None], "default": "jpeg",
                   "description": "raw: BGR uint8, row-major, height x width x 3, no header"},
        "region": {"type": ["string", "null"], "enum": [*REGIONS, None], "default": "full",
                   "description": "full: the template frame with the mouth pasted in; prediction: the "
                                  "network's 320x320 output (paste it at crop_box yourself)"},
        "jpeg_quality": _int("1..100", minimum=1, maximum=100, default=90, type=["integer", "null"]),
    }
    audio_override = {**AUDIO_BASE64, "description": "an audio file's bytes (WAV, FLAC, OGG, MP3 ...), base64 or a "
                                               "data: URL; omitted or null: the model's default track"}
    frame_request_fields = {
        "model_name": {**NAME, "description": "character model"},
        "frame_id": _int("frame of the audio track (25 fps), from 0", minimum=0, maximum=MAX_FRAME_ID),
        "audio_override": {"anyOf": [audio_override, {"type": "null"}]},
        **output_fields,
    }
    frame_fields = {
        "success": {"const": True},
        "model_name": _str(), "model_version": _str(), "frame_id": _int(),
        "template_id": _int("the character's template frame used"),
        "frame": {**BASE64, "description": "the image, base64"},
        "format": {"type": "string", "enum": list(FORMATS)}, "region": {"type": "string", "enum": list(REGIONS)},
        "width": _int(), "height": _int(),
        "crop_box": {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 5,
                     "description": "x1, y1, x2, y2, size: where the prediction sits in the full frame"},
        "from_cache": BOOL,
        "processing_time_ms": _num("server time for this request (per frame in batches and streams)"),
        "auto_loaded": {"type": "boolean", "description": "the model was not resident and was loaded for this"},
        "timings": ref("Timings"),
    }
    model_info = obj({
        "name": _str(), "version": _str(),
        "state": {"type": "string", "enum": ["loaded", "available", "unspecified"]},
        "location": _str("memory, store or zip"), "audio_mode": _str(), "fps": _int(),
        "frame_count": _int("template frames in the package: the video loop the mouth is painted on (played "
                            "ping-pong, so any frame_id has a template)"),
        "default_track_frames": _int("frames of the model's default audio track: without audio_override, valid "
                                     "frame_ids are 0..default_track_frames-1 (0 until the model is loaded)"),
        "memory_bytes": _int("held now: device_memory_bytes + host_memory_bytes (grows as frames are cached)"),
        "device_memory_bytes": _int("of memory_bytes: on the accelerator (weights, device-resident templates)"),
        "host_memory_bytes": _int("of memory_bytes: in host memory (template crops or PNGs, frames, encodings)"),
        "mapped_memory_bytes": _int("not in memory_bytes: prepared templates mapped from the node's store (page "
                                    "cache, shared by every process on the node holding the character)"),
        "queue_depth": _int(), "idle_seconds": _num()})
    error = obj({"success": {"const": False}, "error": _str("what went wrong"),
                 "code": {"type": "string", "enum": ERROR_CODES, "description": "the gRPC status name"}})
    nullable_int = {"type": ["integer", "null"]}
    ws_common = {"request_id": {"type": ["string", "integer", "null"], "description": "echoed on every reply"}}
    return {
        "Error": error,
        "Health": obj({"status": {"type": "string", "enum": ["healthy", "starting", "draining"]}}),
        "ModelHealth": obj({"service": _str("the model asked about"),
                            "status": {"type": "string", "enum": ["serving", "not_serving"],
                                       "description": "serving: resident and taking requests"}}),
        "Status": obj({
            "success": BOOL, "status": {"type": "string", "enum": ["healthy", "starting", "draining"]},
            "server_version": _str(), "uptime_seconds": _num(), "draining": BOOL, "device": _str(),
            "precision": _str(), "max_batch": _int(), "inflight_requests": _int(),
            "models_resident": {"type": "array", "items": _str()},
            "models_available": {"type": "array", "items": _str(), "description": "packages on local disk"},
            "cache_backend": {"type": "string", "enum": ["memory", "redis"]},
            "registry_url": {"type": ["string", "null"]}, "api_keys_required": BOOL,
            "health_requires_key": {"type": "boolean", "description": "per-model gRPC health needs a key"},
            "websocket_connections": _int(),
            "ports": obj({"grpc": _int(), "http": nullable_int, "metrics": nullable_int}),
            "sessions_active": _int("live sessions running now"),
            "max_sessions": _int("live sessions admitted at once (--max-sessions); 0: no limit")}),
        "Stats": obj({
            "success": BOOL, "server_version": _str(), "uptime_seconds": _num(), "inflight_requests": _int(),
            "draining": BOOL, "device": _str(), "precision": _str(), "max_batch": _int(),
            "models": {"type": "array", "items": obj({
                "name": _str(), "version": _str(), "queue_depth": _int(), "frames_generated": _int("by the model, since it was loaded"),
                "frames_from_cache": _int("since it was loaded"), "batches": _int("since it was loaded"),
                "mean_batch_size": _num(), "sessions_active": _int("live sessions of this model running now")})},
            "cache": obj({"backend": _str(), "hits": _int(), "misses": _int(), "errors": _int(),
                          "bypassed": _int()}),
            "models_resident": _int(), "memory_budget_bytes": _int("0: unlimited"),
            "models_memory_bytes": _int(), "sessions_active": _int("live sessions running now"),
            "max_sessions": _int("live sessions admitted at once (--max-sessions); 0: no limit"),
            "sessions_refused": _int("sessions refused past max_sessions since the pod started")}),
        "ModelInfo": model_info,
        "Models": obj({"success": BOOL, "models": {"type": "array", "items": ref("ModelInfo")},
                       "loaded_models": {"type": "array", "items": _str()},
                       "available_models": {"type": "array", "items": _str()}}),
        "Registry": obj({"success": BOOL, "registry_url": _str(), "packages": {"type": "array", "items": obj({
            "name": _str(), "version": _str(), "size": _int(), "sha256": _str(), "url": _str()})}}),
        "Download": obj({
            "success": BOOL, "model_name": _str(), "version": _str(),
            "source": {"type": "string", "enum": ["memory", "store", "zip", "registry"]},
            "downloaded": {"type": "boolean", "description": "fetched from the registry by this call"},
            "load_time_ms": _num(), "model": ref("ModelInfo")}),
        "FrameRequest": obj(frame_request_fields, ["model_name", "frame_id"], closed=True),
        "Timings": obj({"total_ms": _num(), "features_ms": _num(), "queue_ms": _num(), "inference_ms": _num(),
                        "encode_ms": _num(), "batch_size": _int()}),
        "Frame": obj(frame_fields),
        "BatchRequest": obj({"requests": {"type": "array", "items": ref("FrameRequest"),
                                          "maxItems": max_batch_items}}, closed=True),
        "BatchItem": {"oneOf": [
            {"allOf": [ref("Frame"), obj({"index": _int("position in requests")})]},
            {"allOf": [ref("Error"), obj({"index": _int(), "model_name": {"type": ["string", "null"]},
                                          "frame_id": nullable_int})]}]},
        "BatchResponse": obj({
            "success": {"type": "boolean", "description": "every item succeeded"},
            "results": {"type": "object", "additionalProperties": ref("BatchItem"),
                        "description": "keyed {model_name}_{frame_id} (item_{index} for an item without both; "
                                       "#2, #3 ... appended to repeats)"},
            "total_requests": _int(), "processed_count": _int(), "cached_count": _int(), "failed_count": _int(),
            "auto_loaded_models": {"type": "array", "items": _str()}, "processing_time_ms": _num()}),
        # /ws, client -> server
        "WsFrameRequest": obj({"type": {"const": "frame"}, **ws_common, **frame_request_fields},
                              ["type", "model_name", "frame_id"], closed=True),
        "WsStreamRequest": obj({
            "type": {"const": "stream"}, **ws_common, "model_name": frame_request_fields["model_name"],
            "first": _int("first frame", minimum=0, maximum=MAX_FRAME_ID, default=0, type=["integer", "null"]),
            "last": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_FRAME_ID,
                     "description": "last frame, inclusive; null: end of track"},
            "realtime": {"type": ["boolean", "null"], "default": False, "description": "pace frames at fps"},
            "fps": {"type": ["number", "null"], "minimum": 0, "default": 0, "description": "0: the model's fps"},
            "audio_override": frame_request_fields["audio_override"], **output_fields},
            ["type", "model_name"], closed=True),
        "WsAudioStart": obj({
            "type": {"const": "audio_start"}, **ws_common, "model_name": frame_request_fields["model_name"],
            "sample_rate": _int("of the binary PCM16 messages that follow", minimum=8000, maximum=192000,
                                type=["integer", "null"],
                                default=16000),
            "channels": _int("interleaved", minimum=1, maximum=8, default=1, type=["integer", "null"]),
            **output_fields},
            ["type", "model_name"], closed=True,
            description="then binary messages of 16-bit little-endian PCM, then audio_end"),
        "WsAudioEnd": obj({"type": {"const": "audio_end"}, **ws_common}, ["type"], closed=True),
        "WsPing": obj({"type": {"const": "ping"}, **ws_common}, ["type"], closed=True),
        "WsSessionStart": obj({
            "type": {"const": "session_start"}, **ws_common, "model_name": frame_request_fields["model_name"],
            "sample_rate": _int("16000: a session's audio is 16 kHz mono PCM16, in and out", type=["integer", "null"],
                                default=16000),
            "channels": _int("1", type=["integer", "null"], default=1),
            "unpaced": {"type": ["boolean", "null"], "default": False,
                        "description": "ticks as fast as frames are made and read (offline rendering, tests)"},
            **output_fields},
            ["type", "model_name"], closed=True,
            description="a live session; then binary PCM16 messages (its audio), clear, flush, session_end"),
        "WsClear": obj({"type": {"const": "clear"}, **ws_common}, ["type"], closed=True,
                       description="barge-in: queued audio and frames not yet emitted are dropped"),
        "WsFlush": obj({"type": {"const": "flush"}, **ws_common}, ["type"], closed=True,
                       description="end of an utterance: playback_finished follows once it has played"),
        "WsSessionEnd": obj({"type": {"const": "session_end"}, **ws_common}, ["type"], closed=True),
        # /ws, server -> client
        "WsFrame": {"allOf": [obj({"type": {"const": "frame"}, **ws_common}, ["type"]), ref("Frame")]},
        "WsEnd": obj({"type": {"const": "end"}, "frames": _int("frames sent"), **ws_common}, ["type", "frames"]),
        "WsError": obj({"type": {"const": "error"}, "code": {"type": "string", "enum": ERROR_CODES},
                        "message": _str(), **ws_common,
                        "http_status": _int("429 on a session refused past --max-sessions (the socket then closes "
                                            "with 1013: try another pod)")}, ["type", "code", "message"]),
        "WsPong": obj({"type": {"const": "pong"}, **ws_common}, ["type"]),
        "WsSessionStarted": obj({
            "type": {"const": "session_started"}, **ws_common, "session_id": _str(), "model": _str(),
            "model_version": _str(), "fps": _int(), "sample_rate": _int(), "samples_per_tick": _int(),
            "lookahead_s": _num("audio arriving while idle plays this much later (plus at most one tick)")},
            ["type", "session_id", "fps", "sample_rate", "samples_per_tick", "lookahead_s"]),
        "WsSessionFrame": {"allOf": [obj({
            "type": {"const": "session_frame"}, **ws_common, "tick": _int("0, 1, 2, ... one per 1/fps"),
            "pts": _num("presentation time in seconds: tick / fps"),
            "kind": {"type": "string", "enum": ["idle", "speaking", "repeated"]},
            "audio": _str("base64 PCM16, 16 kHz mono: the audio that plays with this frame")},
            ["type", "tick", "pts", "kind", "audio"]), ref("Frame")]},
        "WsCleared": obj({
            "type": {"const": "cleared"}, **ws_common, "tick": _int("the last tick emitted before the clear"),
            "pts": _num(), "played_samples": _int("of the audio cleared, samples that had played"),
            "dropped_samples": _int("samples that will never play")},
            ["type", "tick", "pts", "played_samples", "dropped_samples"]),
        "WsPlaybackFinished": obj({
            "type": {"const": "playback_finished"}, **ws_common, "utterance": _int("1, 2, ...: between flushes"),
            "tick": _int("the tick that played its last sample"), "pts": _num(), "samples": _int()},
            ["type", "utterance", "tick", "pts", "samples"]),
        # POST /webrtc/offer (api/http/webrtc.py); its data channel carries the Ws* session events above.
        "WebRtcOffer": obj({
            "model_name": frame_request_fields["model_name"],
            "sdp": _str("the browser's offer (RTCPeerConnection.createOffer, after ICE gathering): it must "
                        "receive video, and may receive audio, send a microphone and open a data channel"),
            "type": {"const": "offer"},
            "codec": {"type": ["string", "null"], "enum": ["h264", "vp8", None],
                      "description": "the video codec; left out: the first of H.264 and VP8 in the offer"},
            "width": _int("video width, even (with height); left out: the model's frame size", minimum=16,
                          maximum=3840, type=["integer", "null"]),
            "height": _int("video height, even (with width)", minimum=16, maximum=2160, type=["integer", "null"]),
            "bitrate_kbps": _int("video bitrate", minimum=100, maximum=20000, default=1500,
                                 type=["integer", "null"]),
            "unpaced": {"type": ["boolean", "null"], "default": False,
                        "description": "ticks as fast as the peer takes frames (tests, offline)"}},
            ["model_name", "sdp", "type"], closed=True),
        "WebRtcAnswer": obj({
            "sdp": _str("the pod's answer, with its ICE candidates"), "type": {"const": "answer"},
            "session_id": _str("the session's id (as session_started says)"),
            "codec": {"type": "string", "enum": ["h264", "vp8"]}}),
        "WebRtcMediaStarted": obj({
            "type": {"const": "media_started"},
            "tick": _int("the first tick both tracks carry: each track's first RTP timestamp is this tick"),
            "pts": _num(), "codec": {"type": "string", "enum": ["h264", "vp8"]}}),
        "WebRtcControl": obj({"type": {"type": "string", "enum": ["clear", "flush", "session_end", "ping"]}},
                             closed=True),
        "WsSessionEnded": obj({
            "type": {"const": "session_ended"}, **ws_common, "ticks": _int(),
            "frames": obj({kind: _int() for kind in ("speaking", "idle_cached", "idle_computed", "repeated")}),
            "dropped": _int("frames this (slow) reader never got"),
            "reason": {"type": "string", "enum": ["ended", "draining"],
                       "description": "ended: the client's session_end; draining: the pod is shutting down "
                                      "(start a new session: the Service sends it to another pod)"}},
            ["type", "ticks", "frames", "dropped", "reason"]),
    }


def _json(schema_name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ref(schema_name)}}}


def _health(description: str) -> dict:
    """The pod's health, or one model's (``?service=NAME``)."""
    return {"description": description, "content": {"application/json": {"schema": {
        "oneOf": [ref("Health"), ref("ModelHealth")]}}}}


def _errors(*statuses: str) -> dict:
    return {status: {"$ref": f"#/components/responses/E{status}"} for status in statuses}


def _operation(operation_id: str, summary: str, ok: dict, errors: tuple[str, ...], *, security=None,
               **extra) -> dict:
    op = {"operationId": operation_id, "summary": summary, "responses": {"200": ok, **_errors(*errors)},
          **extra}
    if security is not None:
        op["security"] = security
    return op


def openapi_document(version: str, max_batch_items: int, *, keys_required: bool,
                     health_requires_key: bool = False) -> dict[str, Any]:
    """The document of a pod as it runs: with ``keys_required`` (--api-keys-file), every route but /health,
    /metrics and /openapi.json declares API-key security and a 401; without, none does. With
    ``health_requires_key``, /health?service=NAME declares its 401 too."""
    authed = ("401",) if keys_required else ()
    scoped = (*authed, "503")  # refused while draining
    frame_errors = ("400", *authed, "404", "413", "429", "500", "503", "507")  # 507: loading the model
    registry_errors = (*scoped, "409")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "SyncTalk_2D lip-sync inference pod: HTTP gateway",
            "version": version,
            "description": "REST and WebSocket front door of an inference pod; the same engine, cache, limits, "
                           "API keys and errors as its gRPC service (lipsync.v1.LipSync). Errors are JSON "
                           "{success: false, error, code} where code is the gRPC status name.",
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/health": {"get": {
                "operationId": "health",
                "summary": "200 while serving, 503 while starting (preloading) or draining; with service=NAME, "
                           "that model's health as gRPC Health.Check answers it",
                "security": OPEN,
                "parameters": [{"name": "service", "in": "query", "required": False, "schema": SERVICE,
                                "description": "a model: 200 serving (resident), 503 not serving, 404 unknown; "
                                               "empty, as left out: the pod itself (gRPC's service \"\")"
                                               + (" (needs a key: --health-requires-key)"
                                                  if health_requires_key else "")}],
                "responses": {
                    "200": _health("serving"), "503": _health("starting, draining, or the model is not resident"),
                    **_errors("400", *(("401",) if health_requires_key else ()), "404")}}},
            "/metrics": {"get": _operation(
                "metrics", "Prometheus text exposition (the metrics port's registry)",
                {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}, (),
                security=OPEN)},
            "/openapi.json": {"get": _operation(
                "openapi", "this document", {"description": "OpenAPI 3.1",
                                             "content": {"application/json": {"schema": {"type": "object"}}}},
                (), security=OPEN)},
            "/": {"get": _operation(
                "livePage", "the live page: a live session; microphone or audio file in, frames and voice out (it sends your key to /ws)",
                {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}, (),
                security=OPEN)},
            "/web/{name}": {"get": _operation(
                "livePageFile", "the live page's files: its scripts, AudioWorklet and style sheet",
                {"description": "the file", "content": {"text/javascript": {"schema": {"type": "string"}},
                                                        "text/css": {"schema": {"type": "string"}}}}, ("404",),
                security=OPEN, parameters=[{"name": "name", "in": "path", "required": True,
                                            "schema": {"enum": ["app.js", "transport.js", "playout.js", "voice.js",
                                                                "worklet.js", "style.css"]}}])},
            "/status": {"get": _operation("status", "server state; answers while draining too",
                                          _json("Status", "state"), authed)},
            "/stats": {"get": _operation("stats", "the numbers of gRPC GetStats", _json("Stats", "stats"),
                                         scoped)},
            "/models": {"get": _operation("listModels", "resident models and local packages",
                                          _json("Models", "models"), scoped)},
            "/models/registry": {"get": _operation(
                "listRegistry", "the packages in the model registry", _json("Registry", "registry listing"),
                registry_errors)},
            "/models/download": {"post": _operation(
                "downloadModel", "make the registry's newest (or the given) version of a model resident",
                _json("Download", "loaded"), ("400", "404", *registry_errors, "507"),
                parameters=[
                    {"name": "model_name", "in": "query", "required": True, "schema": NAME},
                    {"name": "version", "in": "query", "required": False, "schema": NAME,
                     "description": "leave it out for the registry's newest version"}])},
            "/generate/frame": {"post": _operation(
                "generateFrame", "one frame", _json("Frame", "the frame"), frame_errors,
                requestBody={"required": True, "content": {"application/json": {"schema": ref("FrameRequest")}}})},
            "/generate/batch": {"post": _operation(
                "generateBatch", "many frames; a failing item fails alone (its result holds the error)",
                _json("BatchResponse", "one result per request"), ("400", *authed, "413", "500", "503"),
                requestBody={"required": True, "content": {"application/json": {"schema": ref("BatchRequest")}}})},
            "/webrtc/offer": {"post": _operation(
                "webrtcOffer", "a live session over WebRTC: video (H.264/VP8) and Opus audio tracks timed by the "
                "session's clock, a microphone track as its input, control and events on a data channel",
                _json("WebRtcAnswer", "the answer, once the session has started"),
                ("400", *authed, "403", "404", "413", "429", "500", "503", "507"),
                requestBody={"required": True, "content": {"application/json": {"schema": ref("WebRtcOffer")}}},
                **{"x-data-channel-messages": {
                    "client": [ref("WebRtcControl"), {"description": "binary: PCM16 16 kHz mono audio"}],
                    "server": [ref(n) for n in ("WsSessionStarted", "WebRtcMediaStarted", "WsCleared",
                                                "WsPlaybackFinished", "WsSessionEnded", "WsError", "WsPong")]}})},
            "/ws": {"get": {
                "operationId": "websocket",
                "summary": "WebSocket: frame requests, frame streams and live audio (see x-websocket-messages)",
                "description": "JSON text messages; binary messages are 16-bit little-endian PCM of the open "
                               "audio session. Each operation answers frame messages and, for streams and "
                               "audio, an end message; a failed operation answers an error message and the "
                               "socket stays open. A message over --max-message-mb closes the socket (1009). A "
                               "plain GET without the handshake headers answers 400.",
                "parameters": WEBSOCKET_HANDSHAKE,
                "responses": {"101": {"description": "switching protocols"},
                              **_errors("400", *authed, "403", "503")},
                "x-websocket-messages": {
                    "client": [ref(n) for n in ("WsFrameRequest", "WsStreamRequest", "WsAudioStart", "WsAudioEnd",
                                                "WsSessionStart", "WsClear", "WsFlush", "WsSessionEnd", "WsPing")],
                    "server": [ref(n) for n in ("WsFrame", "WsEnd", "WsError", "WsPong", "WsSessionStarted",
                                                "WsSessionFrame", "WsCleared", "WsPlaybackFinished",
                                                "WsSessionEnded")]},
            }},
        },
        "components": {
            "schemas": _schemas(max_batch_items),
            "responses": {f"E{status}": _json("Error", text) for status, text in ERROR_STATUSES.items()},
        },
    }
    if keys_required:
        document["security"] = [{"ApiKeyHeader": []}, {"BearerAuth": []}]
        document["paths"]["/ws"]["get"]["security"] = [{"ApiKeyHeader": []}, {"BearerAuth": []},
                                                       {"ApiKeyQuery": []}]
        document["components"]["securitySchemes"] = {
            "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "BearerAuth": {"type": "http", "scheme": "bearer"},
            "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": "api_key",
                            "description": "/ws only: browsers cannot set headers on a WebSocket"},
        }
    return document
