"""The live page at / of a real pod: its files over HTTP, and (when Chromium is installed) a headless browser
that opens a live session with the trained demo, over the WebSocket (forced) and over WebRTC (the page's
choice), plays a file into it, barges in, then speaks into a fake microphone and barges in again."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiohttp import ClientSession, WSMsgType, web
from live_page_support import browser_missing, canvas, chromium, mouth_darkness, page, until, video
from serving_support import LOOPBACK, ServerThread, free_port, models_dir_with

from inference_pod.api.http.live_page import WEB_FILES
from inference_pod.serving.settings import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "page-key"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "live-page-session.png"
WEBRTC_SCREENSHOT = SCREENSHOT.with_name("live-page-webrtc.png")


def _settings(models: Path, keys: Path, max_sessions: int = 4) -> Settings:
    # Session frames rendered a second ahead of their tick: a busy shared CPU makes more of them in time
    # (the page plays them on the session's timeline whatever the render-ahead).
    return Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models, max_batch=8,
                    max_batch_delay_ms=20, encode_threads=2, shutdown_grace_s=5, api_keys_file=keys,
                    session_render_ahead_ms=1000, max_sessions=max_sessions)


def _get(url: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page-keys") / "keys"
    path.write_text(f"{KEY}\n")
    return path


def test_page_and_its_files_are_served_without_third_party_scripts(tmp_path, keys_file):
    pod = ServerThread(_settings(models_dir_with(tmp_path / "models", "demo-1"), keys_file))
    base = f"http://{LOOPBACK}:{pod.server.gateway.port}"
    try:
        status, kind, body = _get(base + "/")
        assert status == 200 and kind.startswith("text/html")
        html = body.decode()
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("web/") for s in sources), sources  # nothing from another origin
        for name, content_type in WEB_FILES.items():
            status, kind, body = _get(f"{base}/web/{name}")
            assert status == 200 and kind.startswith(content_type) and body, name
        for path in ("/web/gateway.py", "/web/..%2Fgateway.py", "/web/"):
            assert _get(base + path)[0] == 404, path
        # The page is public; what it calls is not.
        assert _get(base + "/models")[0] == 401
        assert _get(base + "/models", {"X-API-Key": KEY})[0] == 200
    finally:
        pod.close()


def _connect(driver, url: str) -> None:
    """Opens the page, which connects at once; this pod wants a key, which the page says in one line."""
    driver.get(url)
    deadline = time.monotonic() + 60
    while not (shown := page(driver))["error"]:
        assert time.monotonic() < deadline, f"no error line for the missing key: {shown}"
    assert shown["status"] == "this pod asks for an API key: type it, then Connect", shown
    driver.find_element("id", "api-key").send_keys(KEY)
    driver.find_element("id", "refresh").click()


def _stop_returns_to_idle(driver) -> dict:
    """Stop: the avatar is idle again (frames after the clear), keeps idling, and no error shows."""
    driver.find_element("id", "stop").click()
    stopped = until(driver, lambda p: p["status"].startswith("stopped") and p["state"] == "idle", "idle after Stop")
    # Idle frames keep coming after the barge-in, with no speaking one among them and no voice.
    later = until(driver, lambda p: p["idle"] >= stopped["idle"] + 10, "idle frames after Stop")
    assert later["state"] == "idle", later
    assert (later["speaking"], later["voice_s"]) == (stopped["speaking"], stopped["voice_s"]), (stopped, later)
    return later


@pytest.mark.timeout(600)  # Chromium, a trained demo and seconds of voice at whatever pace a busy CPU allows
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_session_on_the_page_idles_speaks_a_file_and_stops_mid_word(tmp_path, keys_file):
    from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech
    from inference_pod.tools.lipsync_quality import held_out_speech
    from inference_pod.tools.synctalk_dataset import encode_wav_pcm16

    models = tmp_path / "models"
    models.mkdir()
    build_demo_package("demo", models / "demo-1.zip", width=TRAINED.width, speech=default_speech(), trained=True)
    voice = tmp_path / "voice.wav"  # the file played into the session, and the fake microphone's loop
    speech = np.concatenate([held_out_speech()] * 2)  # 16 s: Stop comes mid-file however slow the pod is
    voice.write_bytes(encode_wav_pcm16(speech))

    pod = ServerThread(_settings(models, keys_file))
    driver = chromium(voice)
    try:
        _connect(driver, f"http://{LOOPBACK}:{pod.server.gateway.port}/?transport=ws")

        # Idle from the start: frames of kind idle, no voice. (Sixty of them: the pod has warmed up.)
        idle = until(driver, lambda p: p["idle"] >= 60 and p["state"] == "idle", "idle frames")
        assert idle["speaking"] == 0 and idle["voice_s"] == 0 and idle["transport"] == "WebSocket", idle
        closed = max(mouth_darkness(canvas(driver)) for _ in range(5))

        # A file plays as a voice would: frames carrying its voice come back (made in time: speaking; or, on
        # a CPU too busy for the clock, repeated) and the page schedules that voice with Web Audio.
        driver.find_element("id", "file").send_keys(str(voice))
        speaking = until(driver, lambda p: p["state"] == "speaking" and p["voice_s"] > 0, "the state speaking")
        assert speaking["status"] == "playing voice.wav", speaking
        assert driver.find_element("id", "screen").is_displayed()
        assert not driver.find_element("id", "video").is_displayed()
        # The screenshot mid-word: the mouth open if the pod shows one within a few seconds (a pace, not a
        # result: not asserted; tests/api/test_session.py measures the lips).
        deadline = time.monotonic() + 8
        while mouth_darkness(canvas(driver)) <= closed + 0.02 and time.monotonic() < deadline:
            until(driver, lambda p: p["state"] == "speaking", "the state speaking until Stop", timeout_s=5)
        shown = page(driver)  # reported, not asserted (a pace): how far the picture trails its voice
        print(f"picture after its voice {shown['lag_ms']} ms, timeline moved {shown['rebased']} times; frames "
              f"speaking/idle/repeated {shown['speaking']}/{shown['idle']}/{shown['repeated']}")
        driver.save_screenshot(str(tmp_path / "live-page.png"))
        after_file = _stop_returns_to_idle(driver)
        assert "of the voice had played" in after_file["status"], after_file
        # Stopped mid-file: some of the voice had played, not all of it.
        assert 0 < float(after_file["status"].split()[1]) < len(speech) / 16000, after_file["status"]

        # The microphone: speaking again, and Stop again.
        driver.find_element("id", "mic").click()
        until(driver, lambda p: p["state"] == "speaking" and p["voice_s"] > after_file["voice_s"],
               "the microphone's voice coming back")
        _stop_returns_to_idle(driver)

        # Connect again: a new session, shown from its first ticks (the old one's barge-in is forgotten).
        driver.find_element("id", "refresh").click()
        again = until(driver, lambda p: p["idle"] >= 10, "the new session's idle frames")
        assert again["state"] == "idle" and again["tick"] < 100 and again["voice_s"] == 0, again
        if os.environ.get("LIPSYNC_UPDATE_SCREENSHOT"):  # refresh the one in docs/ (a small PNG)
            _save_small_png(tmp_path / "live-page.png", SCREENSHOT)
    finally:
        driver.quit()
        pod.close()


def _save_small_png(source: Path, target: Path) -> None:
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    content = np.flatnonzero((image != image[-1:, :1]).any(axis=(1, 2)))  # rows not all the page background
    image = image[: content[-1] + 24] if len(content) else image
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def _trained_demo_and_voice(tmp_path: Path) -> tuple[Path, Path, float]:
    """A models folder with the trained demo, and 16 s of held-out speech as a WAV (Stop comes mid-file)."""
    from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech
    from inference_pod.tools.lipsync_quality import held_out_speech
    from inference_pod.tools.synctalk_dataset import encode_wav_pcm16

    models = tmp_path / "models"
    models.mkdir()
    build_demo_package("demo", models / "demo-1.zip", width=TRAINED.width, speech=default_speech(), trained=True)
    voice = tmp_path / "voice.wav"
    speech = np.concatenate([held_out_speech()] * 2)
    voice.write_bytes(encode_wav_pcm16(speech))
    return models, voice, len(speech) / 16000


def _webrtc_stop_returns_to_idle(driver) -> dict:
    """Stop over WebRTC: the player's audio goes silent (idle) and stays so while the video keeps playing."""
    driver.find_element("id", "stop").click()
    stopped = until(driver, lambda p: p["status"].startswith("stopped") and p["state"] == "idle", "idle after Stop")
    later = until(driver, lambda p: p["frames"] >= stopped["frames"] + 25, "a second of video after Stop")
    assert later["state"] == "idle" and later["voice_s"] == stopped["voice_s"], (stopped, later)
    return later


@pytest.mark.timeout(600)
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_the_page_plays_a_session_over_webrtc_in_a_video_element(tmp_path, keys_file):
    models, voice, voice_s = _trained_demo_and_voice(tmp_path)
    pod = ServerThread(_settings(models, keys_file))
    driver = chromium(voice)
    try:
        _connect(driver, f"http://{LOOPBACK}:{pod.server.gateway.port}/")  # the page's own choice: WebRTC

        # The <video> element plays the session's tracks: frames decoded, silence (idle), no voice yet.
        idle = until(driver, lambda p: p["frames"] >= 25 and p["state"] == "idle", "a second of idle video")
        assert idle["transport"] == "WebRTC" and idle["voice_s"] == 0, idle
        assert idle["status"].endswith("frames/s over WebRTC"), idle
        assert driver.find_element("id", "video").is_displayed()
        assert not driver.find_element("id", "screen").is_displayed()
        assert driver.execute_script("return document.getElementById('video').srcObject.getTracks().length") == 2
        closed = max(mouth_darkness(video(driver)) for _ in range(5))

        # A file, sent over the data channel in real time: the player's audio turns to voice (speaking).
        driver.find_element("id", "file").send_keys(str(voice))
        speaking = until(driver, lambda p: p["state"] == "speaking" and p["voice_s"] > 0, "the state speaking")
        assert speaking["status"] == "playing voice.wav", speaking
        # The screenshot mid-word: the mouth open if the pod shows one within a few seconds (a pace: not asserted).
        deadline = time.monotonic() + 8
        while mouth_darkness(video(driver)) <= closed + 0.02 and time.monotonic() < deadline:
            until(driver, lambda p: p["state"] in ("speaking", "idle"), "the video playing", timeout_s=5)
        driver.save_screenshot(str(tmp_path / "live-page-webrtc.png"))
        after_file = _webrtc_stop_returns_to_idle(driver)
        assert "of the voice had played" in after_file["status"], after_file
        assert float(after_file["status"].split()[1]) < voice_s, after_file["status"]

        # The fake microphone, as the connection's audio track: speaking again, and Stop again.
        driver.find_element("id", "mic").click()
        until(driver, lambda p: p["state"] == "speaking" and p["voice_s"] > after_file["voice_s"],
               "the microphone's voice coming back")
        _webrtc_stop_returns_to_idle(driver)
        if os.environ.get("LIPSYNC_UPDATE_SCREENSHOT"):
            _save_small_png(tmp_path / "live-page-webrtc.png", WEBRTC_SCREENSHOT)
    finally:
        driver.quit()
        pod.close()


class _IngressBeforeWebRtc:
    """A reverse proxy in front of the pod that forwards what a pod had before WebRTC (the page, /models, /ws)
    and answers POST /webrtc/offer with a plain 404, as an older pod or an ingress without the route does.
    It keeps the Host the page asked for, as ingresses do (the pod checks the page's origin against it)."""

    def __init__(self, upstream_port: int):
        self.upstream = f"http://{LOOPBACK}:{upstream_port}"
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(30), "the proxy did not start"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.client = ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, LOOPBACK, self.port).start()

    def _headers(self, request: web.Request) -> dict[str, str]:
        names = ("Host", "Origin", "X-API-Key", "Content-Type")
        return {name: request.headers[name] for name in names if name in request.headers}

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/webrtc/"):
            raise web.HTTPNotFound()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        async with self.client.request(request.method, self.upstream + request.path_qs, data=await request.read(),
                                       headers=self._headers(request)) as reply:
            return web.Response(status=reply.status, body=await reply.read(),
                                headers={"Content-Type": reply.headers.get("Content-Type", "text/plain")})

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        page = web.WebSocketResponse()
        await page.prepare(request)
        async with self.client.ws_connect(self.upstream + request.path_qs, headers=self._headers(request)) as pod:
            async def upstream() -> None:
                async for message in page:
                    if message.type == WSMsgType.TEXT:
                        await pod.send_str(message.data)
                    elif message.type == WSMsgType.BINARY:
                        await pod.send_bytes(message.data)
                await pod.close()

            sending = asyncio.ensure_future(upstream())
            async for message in pod:
                if message.type == WSMsgType.TEXT:
                    await page.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await page.send_bytes(message.data)
            sending.cancel()
        await page.close()
        return page

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.client.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.mark.timeout(300)
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_page_without_the_webrtc_route_falls_back_to_the_websocket(tmp_path, keys_file):
    pod = ServerThread(_settings(models_dir_with(tmp_path / "models", "demo-1"), keys_file))
    ingress = _IngressBeforeWebRtc(pod.server.gateway.port)
    driver = chromium()
    try:
        _connect(driver, f"http://{LOOPBACK}:{ingress.port}/")
        shown = until(driver, lambda p: p["idle"] >= 10, "the WebSocket session's idle frames")
        assert shown["transport"] == "WebSocket" and shown["state"] == "idle", shown
        assert shown["status"].endswith("frames/s over WebSocket (fell back: POST /webrtc/offer: HTTP 404)"), shown
        # Forced to WebRTC (?transport=webrtc): no fallback, the reason in one line.
        _connect(driver, f"http://{LOOPBACK}:{ingress.port}/?transport=webrtc")
        deadline = time.monotonic() + 60
        while not ((shown := page(driver))["error"] and shown["state"] == "disconnected"):
            assert time.monotonic() < deadline, f"no error line for the missing WebRTC route: {shown}"
        assert (shown["transport"], shown["status"]) == ("WebRTC", "POST /webrtc/offer: HTTP 404"), shown
    finally:
        driver.quit()
        ingress.close()
        pod.close()


@pytest.mark.timeout(300)
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_page_past_the_pods_sessions_says_so_in_one_line(tmp_path, keys_file):
    pod = ServerThread(_settings(models_dir_with(tmp_path / "models", "demo-1"), keys_file, max_sessions=1))
    url = f"http://{LOOPBACK}:{pod.server.gateway.port}/"
    driver = chromium()
    try:
        _connect(driver, url)
        until(driver, lambda p: p["state"] == "idle", "the first page's session idling")
        driver.switch_to.new_window("tab")  # a second viewer: past --max-sessions 1
        _connect(driver, url)
        deadline = time.monotonic() + 60
        while not ((shown := page(driver))["error"] and shown["state"] == "disconnected"):
            assert time.monotonic() < deadline, f"no error line for the refused session: {shown}"
        assert shown["status"].startswith("RESOURCE_EXHAUSTED: this pod already runs its maximum of 1 live "
                                          "session"), shown
        assert "\n" not in shown["status"] and shown["state"] == "disconnected", shown
    finally:
        driver.quit()
        pod.close()
