"""``lipsync verify``: a grid image for checking a character's predictions by eye.

One row per sampled output frame: the template's 320x320 crop (what the network was given, mouth included)
beside the network's 320x320 prediction for that frame's audio, and optionally the composited full frame.
A working model reproduces the crop outside the mouth and draws a mouth that moves with the audio; a broken
package, a wrong crop box or mismatched weights show at a glance. Uses the engine directly, no server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inference_pod.core.engine import Engine
from inference_pod.core.model import MODEL_INPUT_SIZE
from inference_pod.errors import InvalidInput, LipSyncError

TILE = MODEL_INPUT_SIZE  # 320: every tile, so crop and prediction are shown pixel for pixel
GAP = 4
LABEL_H = 22
TITLE_H = 30
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class VerifyResult:
    path: Path
    frame_ids: list[int]
    template_ids: list[int]
    size: tuple[int, int]  # width, height of the grid
    columns: list[str]
    mean_abs_diff: list[float]  # per row: prediction against its template crop, 0..255


def sample_frames(track_frames: int, count: int) -> list[int]:
    """``count`` frame ids spread evenly over the track, first and last included."""
    if count < 1:
        raise InvalidInput(f"--frames must be >= 1, got {count}")
    return sorted({int(round(x)) for x in np.linspace(0, track_frames - 1, min(count, track_frames))})


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """The image scaled to fit a side x side tile (aspect kept), centred on the background."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
    y, x = (side - resized.shape[0]) // 2, (side - resized.shape[1]) // 2
    tile[y : y + resized.shape[0], x : x + resized.shape[1]] = resized
    return tile


def _label(width: int, height: int, text: str, scale: float = 0.45) -> np.ndarray:
    strip = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    cv2.putText(strip, text, (6, height - 7), FONT, scale, TEXT, 1, cv2.LINE_AA)
    return strip


def build_grid(engine: Engine, features: np.ndarray, frame_ids: list[int], *, composite: bool = False,
               title: str = "") -> tuple[np.ndarray, list[int], list[float]]:
    templates = [engine.template_index(i) for i in frame_ids]
    predictions = engine.predict(templates, engine.windows(features, frame_ids))
    columns = 3 if composite else 2
    width = columns * TILE + (columns - 1) * GAP
    blocks = [_label(width, TITLE_H, title, 0.55)] if title else []
    diffs = []
    for frame_id, template, prediction in zip(frame_ids, templates, predictions, strict=True):
        crop = engine.template_crop(template)
        diffs.append(float(np.abs(prediction.astype(np.int16) - crop.astype(np.int16)).mean()))
        tiles = [crop, prediction]
        labels = [f"frame {frame_id}: template {template} crop", f"prediction (mean |diff| {diffs[-1]:.1f})"]
        if composite:
            tiles.append(_fit(engine.composite(template, prediction), TILE))
            labels.append("composited frame")
        gap = np.full((TILE + LABEL_H, GAP, 3), BACKGROUND, dtype=np.uint8)
        cells = [np.vstack([_label(TILE, LABEL_H, text), tile]) for text, tile in zip(labels, tiles, strict=True)]
        row = cells[0]
        for cell in cells[1:]:
            row = np.hstack([row, gap, cell])
        blocks += [row, np.full((GAP, width, 3), BACKGROUND, dtype=np.uint8)]
    return np.vstack(blocks[:-1]), templates, diffs


def verify(package_path: Path, out: Path, *, audio_path: Path | None = None, frames: int = 6,
           composite: bool = False, device: str = "cpu", precision: str = "fp32",
           cache_dir: Path | None = None) -> VerifyResult:
    """Write the grid PNG for ``frames`` frames of the package's default track (or of ``audio_path``)."""
    from inference_pod.package import open_package
    from inference_pod.tools.render import track_for

    package = open_package(package_path, cache_dir=cache_dir)
    engine = Engine.from_package(package, device=device, precision=precision, max_batch=max(1, frames))
    try:
        features = track_for(engine, audio_path, None)
        ids = sample_frames(len(features), frames)
        source = audio_path.name if audio_path is not None else "default track"
        title = f"{engine.name} {engine.version} ({package.manifest.model_width}-wide {engine.mode}), {source}"
        grid, templates, diffs = build_grid(engine, features, ids, composite=composite, title=title)
    finally:
        engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), grid):
        raise LipSyncError(f"cannot write {out} (use a .png or .jpg name)")
    columns = ["template crop", "prediction"] + (["composited"] if composite else [])
    return VerifyResult(out, ids, templates, (grid.shape[1], grid.shape[0]), columns, diffs)
