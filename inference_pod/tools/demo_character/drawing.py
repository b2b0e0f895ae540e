"""The demo character's look: a per-seed style, frames drawn with OpenCV (sub-pixel coordinates), the
SyncTalk_2D landmarks of each frame, and the mouth's opening and width from the voice (``mouth_track``)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from inference_pod.core import audio

DEMO_FPS = 25
SHIFT = 4  # OpenCV drawing with 1/16-pixel coordinates, so slow head motion stays smooth
MOUTH_INTERIOR = (30, 20, 50)  # BGR: the dark inside of the open mouth (lipsync_quality measures it)


@dataclass(frozen=True)
class Style:
    """Per-seed look and motion of the character."""

    background_top: np.ndarray
    background_bottom: np.ndarray
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    iris: tuple[float, float, float]
    phases: np.ndarray  # head x, head y, mouth slow, mouth fast, blink


def character_style(seed: int) -> Style:
    rng = np.random.default_rng(seed)
    skin = rng.uniform([120, 150, 190], [170, 190, 235])  # BGR
    return Style(
        background_top=rng.uniform(40, 200, size=3),
        background_bottom=rng.uniform(20, 120, size=3),
        skin=tuple(skin),
        hair=tuple(rng.uniform(10, 90, size=3)),
        shirt=tuple(rng.uniform(30, 220, size=3)),
        iris=tuple(rng.uniform(20, 160, size=3)),
        phases=rng.uniform(0, 2 * np.pi, size=5),
    )


def _fixed(x: float) -> int:
    return int(round(x * (1 << SHIFT)))


def _pt(x: float, y: float) -> tuple[int, int]:
    return _fixed(x), _fixed(y)


def _ellipse(img, center, axes, color, thickness=-1, angle=0.0, start=0, end=360) -> None:
    cx, cy = center
    ax, ay = axes
    cv2.ellipse(img, _pt(cx, cy), _pt(max(ax, 0.5), max(ay, 0.5)), angle, start, end, color, thickness, cv2.LINE_AA, SHIFT)


def _on_ellipse(cx, cy, rx, ry, angles) -> np.ndarray:
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)


# Mouth from audio. Frame i's network input covers roughly i/25 - 0.36 s ... i/25 + 0.44 s of audio (16
# AVE windows of 0.2 s, see audio.py); the loudness is taken near the middle of that span.
MOUTH_CENTER_S = 0.04  # seconds after frame i's start
MOUTH_HALF_WINDOW_S = 0.04
QUIET_DB, LOUD_DB = -42.0, -16.0  # RMS level (dB full scale) of a closed and of a fully open mouth
LOW_BAND, HIGH_BAND = (200.0, 1500.0), (1500.0, 4000.0)  # Hz: "oo"-like vs "ee"-like energy


def mouth_track(wav16k: np.ndarray, n_frames: int) -> np.ndarray:
    """(n_frames, 2) float32: per 25 fps frame, the mouth opening (0 closed .. 1 wide open) and width factor.

    Opening: RMS level of the 80 ms around the frame, mapped from QUIET_DB..LOUD_DB to 0..1, then smoothed
    over three frames. Width: 0.85 (rounded, low band dominates) .. 1.15 (spread, high band dominates).
    Both are pure functions of the audio near the frame, so a network that sees that audio can learn them.
    """
    wav = np.asarray(wav16k, dtype=np.float64)
    sr = audio.SAMPLE_RATE
    half = int(MOUTH_HALF_WINDOW_S * sr)
    window = np.hanning(2 * half)
    freqs = np.fft.rfftfreq(2 * half, 1 / sr)
    low = (freqs >= LOW_BAND[0]) & (freqs < LOW_BAND[1])
    high = (freqs >= HIGH_BAND[0]) & (freqs < HIGH_BAND[1])
    padded = np.concatenate([np.zeros(2 * half), wav, np.zeros(2 * half)])
    level = np.empty(n_frames)
    brightness = np.empty(n_frames)
    for i in range(n_frames):
        center = int((i / DEMO_FPS + MOUTH_CENTER_S) * sr) + 2 * half
        chunk = padded[center - half : center + half] if center + half <= padded.size else np.zeros(2 * half)
        level[i] = 10 * np.log10(np.mean(chunk**2) + 1e-12)
        spectrum = np.abs(np.fft.rfft(chunk * window)) ** 2
        brightness[i] = spectrum[high].sum() / (spectrum[low].sum() + spectrum[high].sum() + 1e-12)
    opening = np.clip((level - QUIET_DB) / (LOUD_DB - QUIET_DB), 0.0, 1.0)
    kernel = np.array([0.25, 0.5, 0.25])
    opening = np.convolve(np.pad(opening, 1, mode="edge"), kernel, mode="valid")
    width = 0.85 + 0.3 * np.clip(brightness / 0.5, 0.0, 1.0)
    width = np.where(opening > 0.05, width, 1.0)  # a closed mouth rests at its neutral width
    return np.stack([opening, width], axis=1).astype(np.float32)


def draw_frame(
    index: int, size: tuple[int, int], style: Style, opening: float = 0.0, mouth_width: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One BGR frame and its (110, 2) landmarks; ``opening`` and ``mouth_width`` come from ``mouth_track``.

    Landmark layout (only 1, 31 and 52 matter to SyncTalk_2D's crop): 0-32 jaw contour from the left
    temple round the chin (1 and 31 on the cheeks), 33-41 and 42-50 eyebrows, 51-60 nose (52 just above
    it), 61-68 and 69-76 eyes, 77-96 outer lips, 97-104 inner lips, 105-106 pupils, 107-109 forehead.
    """
    w, h = size
    s = min(w, h)  # the head scales with the short side: a 16:9 frame shows a face and more background
    t = index / DEMO_FPS
    cx = w * 0.5 + 0.025 * s * np.sin(2 * np.pi * 0.31 * t + style.phases[0])
    cy = h * 0.46 + 0.015 * h * np.sin(2 * np.pi * 0.23 * t + style.phases[1])
    rx, ry = 0.26 * s, 0.33 * s
    blink = np.sin(2 * np.pi * 0.35 * t + style.phases[4]) > 0.97  # a short blink every few seconds

    rows = np.linspace(0.0, 1.0, h)[:, None, None]
    cols = np.linspace(-1.0, 1.0, w)[None, :, None]
    img = style.background_top * (1 - rows) + style.background_bottom * rows
    img = np.clip(img * (1.0 - 0.12 * cols**2), 0, 255).astype(np.uint8)  # (h, w, 3): vignetted gradient

    skin = style.skin
    shade = tuple(0.82 * c for c in skin)
    _ellipse(img, (cx, h * 1.02), (0.55 * w, 0.2 * h), style.shirt)  # shoulders
    cv2.rectangle(img, _pt(cx - 0.32 * rx, cy + 0.6 * ry), _pt(cx + 0.32 * rx, h * 0.9), shade, -1, cv2.LINE_AA, SHIFT)
    _ellipse(img, (cx, cy - 0.18 * ry), (1.1 * rx, 0.95 * ry), style.hair)  # hair behind the head
    _ellipse(img, (cx, cy), (rx, ry), skin)

    eye_y, eye_dx = cy - 0.26 * ry, 0.4 * rx
    eye_rx, eye_ry = 0.2 * rx, (0.015 if blink else 0.1) * ry
    eyes, pupils, brows = [], [], []
    for side in (-1, 1):
        ex = cx + side * eye_dx
        _ellipse(img, (ex, eye_y), (eye_rx, eye_ry), (245, 245, 245))
        if not blink:
            _ellipse(img, (ex, eye_y), (0.45 * eye_ry + 0.5, 0.9 * eye_ry), style.iris)
        _ellipse(img, (ex, eye_y), (eye_rx, eye_ry), (40, 40, 40), thickness=1)
        eyes.append(_on_ellipse(ex, eye_y, eye_rx, eye_ry, np.linspace(0, 2 * np.pi, 8, endpoint=False)))
        pupils.append((ex, eye_y))
        brow = _on_ellipse(ex, eye_y - 0.06 * ry, 1.2 * eye_rx, 0.18 * ry, np.linspace(1.15 * np.pi, 1.85 * np.pi, 9))
        cv2.polylines(img, [np.array([_pt(*p) for p in brow])], False, style.hair, max(1, s // 90), cv2.LINE_AA, SHIFT)
        brows.append(brow)

    nose_top, nose_tip = cy - 0.06 * ry, cy + 0.2 * ry
    nose = np.array(
        [[cx, cy - 0.14 * ry], [cx, nose_top], [cx - 0.02 * rx, cy + 0.04 * ry], [cx - 0.05 * rx, cy + 0.12 * ry],
         [cx, nose_tip], [cx - 0.14 * rx, cy + 0.22 * ry], [cx - 0.07 * rx, cy + 0.25 * ry],
         [cx + 0.07 * rx, cy + 0.25 * ry], [cx + 0.14 * rx, cy + 0.22 * ry], [cx + 0.05 * rx, cy + 0.12 * ry]]
    )  # fmt: skip
    cv2.polylines(img, [np.array([_pt(*p) for p in nose[1:9]])], False, tuple(0.65 * c for c in skin), max(1, s // 128), cv2.LINE_AA, SHIFT)

    mouth_y = cy + 0.5 * ry
    lip_rx, lip_ry = 0.36 * rx * mouth_width, (0.06 + 0.17 * opening) * ry
    inner_rx, inner_ry = 0.3 * rx * mouth_width, (0.005 + 0.16 * opening) * ry
    _ellipse(img, (cx, mouth_y), (lip_rx, lip_ry), (70, 60, 170))
    _ellipse(img, (cx, mouth_y), (inner_rx, inner_ry), MOUTH_INTERIOR)
    # Upper teeth, growing with the opening (a strip that never covers more than a fifth of the interior).
    _ellipse(img, (cx, mouth_y - 0.75 * inner_ry), (0.6 * inner_rx, 0.2 * inner_ry), (235, 235, 240))

    landmarks = np.concatenate(
        [
            _on_ellipse(cx, cy, rx, ry, np.pi - np.pi * np.arange(33) / 32),  # 0-32 jaw, 1 and 31 on the cheeks
            brows[0], brows[1],  # 33-50
            nose,  # 51-60, 52 just above the nose
            eyes[0], eyes[1],  # 61-76
            _on_ellipse(cx, mouth_y, lip_rx, lip_ry, np.linspace(0, 2 * np.pi, 20, endpoint=False)),  # 77-96
            _on_ellipse(cx, mouth_y, inner_rx, inner_ry, np.linspace(0, 2 * np.pi, 8, endpoint=False)),  # 97-104
            np.array(pupils),  # 105-106
            np.array([[cx - 0.5 * rx, cy - 0.7 * ry], [cx, cy - 0.85 * ry], [cx + 0.5 * rx, cy - 0.7 * ry]]),
        ]
    )  # fmt: skip
    return img, landmarks.astype(np.float32)
