"""The live page at / of a real pod: its files over HTTP, and (when Chromium is installed) a headless browser
that speaks into a fake microphone and watches the trained demo answer."""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from serving_support import LOOPBACK, ServerThread, free_port, models_dir_with

from inference_pod.api.http.live_page import WEB_FILES
from inference_pod.serving.settings import Settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "page-key"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def _settings(models: Path, keys: Path) -> Settings:
    return Settings(host=LOOPBACK, port=0, metrics_port=0, http_port=free_port(), models_dir=models, max_batch=8,
                    max_batch_delay_ms=20, encode_threads=2, shutdown_grace_s=5, api_keys_file=keys)


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


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install chromium chromium-driver; make test does it)"
    if shutil.which("espeak-ng") is None:
        return "espeak-ng is not installed (make setup)"
    return None


def _canvas(driver) -> np.ndarray:
    url = driver.execute_script("return document.getElementById('screen').toDataURL('image/png');")
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def _mouth_darkness(frame: np.ndarray) -> float:
    """Share of the demo's mouth box (drawn at 0.55-0.7 of the height, 0.39-0.61 of the width) darker than the skin."""
    h, w = frame.shape[:2]
    mouth = cv2.cvtColor(frame[int(0.54 * h) : int(0.72 * h), int(0.36 * w) : int(0.64 * w)], cv2.COLOR_BGR2GRAY)
    return float((mouth < 0.6 * np.median(mouth)).mean())


def _frames_per_second(package_path: Path, cache: Path) -> float:
    """What this machine computes right now: the demo's frames per second, offline, one thread."""
    from inference_pod.core.engine import Engine
    from inference_pod.package import open_package

    engine = Engine.from_package(open_package(package_path, cache_dir=cache))
    features = engine.default_features
    ids = list(range(min(25, len(features))))
    engine.predict([engine.template_index(0)], engine.windows(features, [0]))  # the first call pays one-off set-up
    start = time.monotonic()
    for i in ids:
        engine.composite(engine.template_index(i), engine.predict([engine.template_index(i)], engine.windows(features, [i]))[0])
    return len(ids) / (time.monotonic() - start)


@pytest.mark.alone
@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_speaking_into_the_page_animates_the_trained_demo(tmp_path, keys_file):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech
    from inference_pod.tools.lipsync_quality import held_out_speech
    from inference_pod.tools.synctalk_dataset import encode_wav_pcm16

    models = tmp_path / "models"
    models.mkdir()
    build_demo_package("demo", models / "demo-1.zip", width=TRAINED.width, speech=default_speech(), trained=True)
    voice = tmp_path / "voice.wav"  # the fake microphone plays this in a loop
    voice.write_bytes(encode_wav_pcm16(held_out_speech()))

    capacity = _frames_per_second(models / "demo-1.zip", tmp_path / "store")
    pod = ServerThread(_settings(models, keys_file))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,900",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={voice}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(f"http://{LOOPBACK}:{pod.server.gateway.port}/")
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "refresh").click()
        WebDriverWait(driver, 30).until(lambda d: "demo" in [o.text for o in Select(d.find_element(By.ID, "model")).options])
        Select(driver.find_element(By.ID, "model")).select_by_visible_text("demo")
        driver.find_element(By.ID, "mic").click()
        spoke = time.monotonic()

        last = lambda d: int(d.execute_script("return Number(document.body.dataset.lastFrame || -1);"))  # noqa: E731
        WebDriverWait(driver, 60).until(lambda d: last(d) >= 25)  # the first second of voice has come back
        # Pace: over the next 4 s of voice, frames keep coming at the audio's 25 per second.
        start_frame, start = last(driver), time.monotonic()
        darkness = []
        while time.monotonic() - start < 4.0:
            frame = _canvas(driver)
            darkness.append(_mouth_darkness(frame))
            time.sleep(0.3)
        elapsed, frames = time.monotonic() - start, last(driver) - start_frame
        print(f"pod capacity {capacity:.1f} frames/s; {frames} frames in {elapsed:.1f} s ({frames / elapsed:.1f}/s); mouth darkness "
              f"{min(darkness):.3f}..{max(darkness):.3f}; shown: {driver.find_element(By.ID, 'fps').text} frames/s, "
              f"delay {driver.find_element(By.ID, 'delay').text}")
        # Never ahead of the voice (a frame needs its audio), and as fast as the voice where this machine's
        # CPU can compute that (measured just before; a slow CI core may not). The browser shares the CPU.
        assert last(driver) <= 25 * (time.monotonic() - spoke) + 1
        pace = min(25.0, capacity)
        assert frames / elapsed > 0.5 * pace, f"{frames} frames in {elapsed:.1f} s, the pod computes {capacity:.1f}/s"
        assert max(darkness) > 1.5 * min(darkness) + 0.01, darkness  # the mouth opens and closes
        assert driver.find_element(By.ID, "status").get_attribute("class") != "error"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # take the screenshot mid-word, mouth open
            if _mouth_darkness(_canvas(driver)) > np.percentile(darkness, 75):
                break
        driver.save_screenshot(str(tmp_path / "live-page.png"))
        if os.environ.get("LIPSYNC_UPDATE_SCREENSHOT"):  # refresh the one in docs/
            shutil.copy(tmp_path / "live-page.png", DOCS / "live-page.png")
    finally:
        driver.quit()
        pod.close()
