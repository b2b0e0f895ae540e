"""The live page in headless Chromium (Selenium): what it shows, read together, and waits on it. Shared by the
page's own tests and the quick start's (`make serve`)."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np


def browser_missing() -> str | None:
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


def canvas(driver) -> np.ndarray:
    url = driver.execute_script("return document.getElementById('screen').toDataURL('image/png');")
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def video(driver) -> np.ndarray:
    """The picture the page's <video> element shows now."""
    url = driver.execute_script("""
        const video = document.getElementById('video');
        const canvas = document.createElement('canvas');
        canvas.width = video.videoWidth || 1; canvas.height = video.videoHeight || 1;
        canvas.getContext('2d').drawImage(video, 0, 0);
        return canvas.toDataURL('image/png');""")
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def mouth_darkness(frame: np.ndarray) -> float:
    """Share of the demo's mouth box (drawn at 0.55-0.7 of the height, 0.39-0.61 of the width) darker than the skin."""
    h, w = frame.shape[:2]
    mouth = cv2.cvtColor(frame[int(0.54 * h) : int(0.72 * h), int(0.36 * w) : int(0.64 * w)], cv2.COLOR_BGR2GRAY)
    return float((mouth < 0.6 * np.median(mouth)).mean())


def chromium(fake_microphone: Path | None = None, *flags: str):
    """Headless Chromium that plays sound without a click, with a fake microphone playing a WAV file."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=760,1080",
                 "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream", *flags):
        options.add_argument(flag)
    if fake_microphone is not None:
        options.add_argument("--use-fake-device-for-media-stream")
        options.add_argument(f"--use-file-for-fake-audio-capture={fake_microphone}")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))


def page(driver) -> dict:
    """What the page shows, read together."""
    return driver.execute_script("""
        const text = (id) => document.getElementById(id).textContent;
        const status = document.getElementById('status');
        return {state: document.body.dataset.state, tick: Number(document.body.dataset.lastTick ?? -1),
                transport: text('transport'), frames: Number(text('frames')),
                speaking: Number(text('shown-speaking')), idle: Number(text('shown-idle')),
                repeated: Number(text('shown-repeated')), voice_s: parseFloat(text('voice-s')),
                lag_ms: parseFloat(text('lag')), rebased: Number(text('rebased')),
                status: status.textContent, error: status.className === 'error'};""")


def until(driver, condition: Callable[[dict], bool], what: str, timeout_s: float = 180) -> dict:
    """Waits until the page shows ``condition``; an error line on the page fails at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = page(driver)
        assert not shown["error"], f"the page shows an error while waiting for {what}: {shown['status']!r}"
        if condition(shown):
            return shown
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s: the page shows {shown}"
