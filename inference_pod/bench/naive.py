"""The baseline: SyncTalk_2D's own per-frame inference loop, reproduced step for step.

For every output frame it reads the template JPEG and its landmarks file from disk, computes the crop,
resizes, masks, runs the network on a batch of one and pastes the result back, exactly as
SyncTalk_2D's inference_328.py does. It is what the engine benchmark compares against, and the
reference the fidelity tests compare ``lipsync render`` with. It is deliberately independent of
inference_pod.core.engine: its own ping-pong stepping, crop, mask and feature window code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from inference_pod.core.model import AUDIO_FEATURE_SHAPES, LipSyncUNet, load_strict

N_LANDMARKS = 110


def write_dataset_layout(package, out_dir: Path) -> Path:
    """Lay a package out as a SyncTalk_2D character directory (full_body_img/N.jpg, landmarks/N.lms).

    Only landmarks 1, 31 and 52 matter to the crop; they are placed so SyncTalk_2D's rule gives back the
    package's crop boxes. Frame bytes are written as they are in the package.
    """
    img_dir, lms_dir = out_dir / "full_body_img", out_dir / "landmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    lms_dir.mkdir(parents=True, exist_ok=True)
    for i, (x1, y1, x2, _y2) in enumerate(np.asarray(package.crop_boxes())):
        (img_dir / f"{i}.jpg").write_bytes(package.frame_bytes(i))
        points = np.zeros((N_LANDMARKS, 2), dtype=np.float32)
        points[1] = (x1, y1)
        points[31] = (x2, y1)
        points[52] = (x1, y1)
        (lms_dir / f"{i}.lms").write_text("\n".join(f"{x} {y}" for x, y in points) + "\n")
    return out_dir


def load_network(unet_state: dict, mode: str, width: int, device: str) -> LipSyncUNet:
    net = LipSyncUNet(mode, width)
    load_strict(net, unet_state, "U-Net")
    return net.eval().to(device)


def synctalk_audio_window(features: np.ndarray, index: int) -> np.ndarray:
    # features[index-8 : index+8], zero-filled where the range leaves the track
    left, right = index - 8, index + 8
    pad_left, pad_right = max(0, -left), max(0, right - features.shape[0])
    window = features[max(left, 0) : min(right, features.shape[0])]
    return np.concatenate(
        [np.zeros((pad_left, *features.shape[1:]), features.dtype), window,
         np.zeros((pad_right, *features.shape[1:]), features.dtype)]
    )


def template_walk(last_template: int, n_frames: int) -> Iterator[int]:
    """SyncTalk_2D's stateful template order: step first, turn at both ends (1, 2, ..., N-1, N-2, ..., 0, 1)."""
    step, img_idx = 0, 0
    for _ in range(n_frames):
        if img_idx > last_template - 1:
            step = -1
        if img_idx < 1:
            step = 1
        img_idx += step
        yield img_idx


def run_loop(
    dataset_dir: Path,
    net: LipSyncUNet,
    features: np.ndarray,
    device: str = "cpu",
    limit: int | None = None,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[np.ndarray]:
    """Yield composited frames for the padded per-frame ``features``, one network call per frame."""
    img_dir, lms_dir = Path(dataset_dir) / "full_body_img", Path(dataset_dir) / "landmarks"
    last_template = len(list(img_dir.glob("*.jpg"))) - 1
    shape = AUDIO_FEATURE_SHAPES[net.mode]
    total = features.shape[0] if limit is None else min(limit, features.shape[0])
    for i, img_idx in enumerate(template_walk(last_template, total)):
        img_path = img_dir / f"{img_idx}.jpg"
        img = cv2.imread(str(img_path))
        if img is None:
            raise FileNotFoundError(f"cannot read template frame {img_path}")
        rows = [np.array(line.split(" "), dtype=np.float32) for line in (lms_dir / f"{img_idx}.lms").read_text().splitlines()]
        lms = np.array(rows, dtype=np.int32)
        xmin, ymin, xmax = lms[1][0], lms[52][1], lms[31][0]
        ymax = ymin + (xmax - xmin)
        crop = img[ymin:ymax, xmin:xmax]
        h, w = crop.shape[:2]
        crop = cv2.resize(crop, (328, 328), interpolation=cv2.INTER_CUBIC)
        crop_out = crop.copy()
        real = crop[4:324, 4:324].copy()
        masked = cv2.rectangle(real.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
        real_t = torch.from_numpy(real.transpose(2, 0, 1).astype(np.float32) / 255.0)
        masked_t = torch.from_numpy(masked.transpose(2, 0, 1).astype(np.float32) / 255.0)
        image = torch.cat([real_t, masked_t], dim=0)[None].to(device)
        audio_t = torch.from_numpy(synctalk_audio_window(features, i).reshape(shape))[None].to(device)
        with torch.no_grad():
            pred = net(image, audio_t)[0]
        pred = np.array(pred.cpu().numpy().transpose(1, 2, 0) * 255, dtype=np.uint8)
        crop_out[4:324, 4:324] = pred
        img[ymin:ymax, xmin:xmax] = cv2.resize(crop_out, (w, h), interpolation=cv2.INTER_CUBIC)
        if on_frame is not None:
            on_frame(i, img)
        yield img
