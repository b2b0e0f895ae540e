"""The live page: plain HTML, CSS and JavaScript from inference_pod/web/, served by the HTTP gateway.

``/`` is the page; ``/web/<file>`` its scripts (ES modules), AudioWorklet and style sheet. They are public like
/openapi.json: the page holds no secret, and every call it makes (/models, the /webrtc/offer or /ws session) sends the API key typed
into it, checked as for any other client. Only the files listed here are served.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

WEB_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "transport.js": "text/javascript",
    "webrtc.js": "text/javascript",
    "playout.js": "text/javascript",
    "voice.js": "text/javascript",
    "worklet.js": "text/javascript",
    "style.css": "text/css",
}


def _read(name: str) -> bytes:
    return resources.files("inference_pod").joinpath("web", name).read_bytes()


async def _index(request: web.Request) -> web.Response:
    return _file_response("index.html")


async def _asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in WEB_FILES:
        raise web.HTTPNotFound()
    return _file_response(name)


def _file_response(name: str) -> web.Response:
    # Read per request: a few KB, and an edited file shows on reload during development.
    return web.Response(body=_read(name), content_type=WEB_FILES[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


def web_routes() -> list[web.RouteDef]:
    return [web.get("/", _index), web.get("/web/{name}", _asset)]
