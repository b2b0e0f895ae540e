"""Converts a SyncTalk_2D character directory (plus its trained checkpoints) into a character package.

A SyncTalk_2D character directory holds::

    full_body_img/0.jpg ... N-1.jpg   the template frames
    landmarks/0.lms ... N-1.lms       110 lines "x y" per frame (PFLD landmarks)
    aud.wav                           the training track (optional here)
    aud_ave.npy                       its AVE features, (T, 512) (optional; aud_hu.npy / aud_wenet.npy per mode)

Crop boxes are computed exactly as SyncTalk_2D's inference does, so the package reproduces its crops.
"""

from __future__ import annotations

import io
import logging
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference_pod.core import audio
from inference_pod.core.model import (
    AUDIO_FEATURE_SHAPES,
    MODE_FPS,
    AveAudioEncoder,
    infer_unet_config,
    load_strict,
    load_tensors,
    normalize_state_dict,
)
from inference_pod.errors import CheckpointError, PackageError
from inference_pod.package import Manifest, feature_dim, image_dimensions, validate_identifier, write_package

log = logging.getLogger(__name__)

FRAMES_DIR = "full_body_img"
LANDMARKS_DIR = "landmarks"
AUDIO_FILE = "aud.wav"
FEATURE_FILES = {"ave": "aud_ave.npy", "hubert": "aud_hu.npy", "wenet": "aud_wenet.npy"}
LANDMARK_COUNT = 110
# The three landmarks SyncTalk_2D's crop uses: left cheek (x1), right cheek (x2), above the nose (y1).
LEFT_CHEEK, RIGHT_CHEEK, NOSE_TOP = 1, 31, 52
ENCODER_BATCH = 256


@dataclass(frozen=True)
class SyncTalkDataset:
    root: Path
    frame_paths: list[Path]
    crop_boxes: np.ndarray  # (N, 4) int32 x1, y1, x2, y2
    image_size: tuple[int, int]  # (width, height)

    @property
    def audio_path(self) -> Path | None:
        path = self.root / AUDIO_FILE
        return path if path.is_file() else None

    def features_path(self, mode: str) -> Path | None:
        path = self.root / FEATURE_FILES[mode]
        return path if path.is_file() else None


def read_landmarks(path: Path, label: str | None = None) -> np.ndarray:
    """(110, 2) float32 landmarks from a .lms file; each line is parsed as float32, as SyncTalk_2D does."""
    label = label or str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PackageError(f"{label} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"{label} cannot be read: {exc}") from None
    points = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise PackageError(f"{label} line {lineno}: expected two numbers 'x y', got {line!r}")
        try:
            point = np.array(parts, dtype=np.float32)
        except ValueError:
            raise PackageError(f"{label} line {lineno}: {line!r} is not two numbers") from None
        # Anything past a million pixels is corrupt, and would overflow the int32 cast below.
        if not np.all(np.isfinite(point)) or np.any(np.abs(point) > 1e6):
            raise PackageError(f"{label} line {lineno}: coordinate {line!r} is not a finite pixel position")
        points.append(point)
    if len(points) != LANDMARK_COUNT:
        raise PackageError(f"{label} has {len(points)} points, SyncTalk_2D's landmark files have {LANDMARK_COUNT}")
    return np.stack(points)


def crop_box(landmarks: np.ndarray, image_size: tuple[int, int], label: str = "landmarks") -> tuple[int, int, int, int]:
    """SyncTalk_2D's face crop: x from points 1 to 31, y from point 52, square; clipped at the image edge.

    The landmarks are cast to int32 first (truncation toward zero), exactly like SyncTalk_2D's
    ``np.array(lms_list, dtype=np.int32)``. Boxes past the right or bottom edge are clipped the way
    numpy slicing ``img[y1:y2, x1:x2]`` clips them; boxes that start outside the image are refused.
    """
    lms = np.asarray(landmarks, dtype=np.float32).astype(np.int32)
    xmin, ymin, xmax = int(lms[LEFT_CHEEK][0]), int(lms[NOSE_TOP][1]), int(lms[RIGHT_CHEEK][0])
    width = xmax - xmin
    ymax = ymin + width
    if width <= 0:
        raise PackageError(
            f"{label}: empty crop box: point {RIGHT_CHEEK} x={xmax} is not right of point {LEFT_CHEEK} x={xmin}"
        )
    img_w, img_h = image_size
    if not (0 <= xmin < img_w and 0 <= ymin < img_h):
        raise PackageError(f"{label}: crop box starts at ({xmin}, {ymin}), outside the {img_w}x{img_h} image")
    return xmin, ymin, min(xmax, img_w), min(ymax, img_h)


def read_dataset(dataset_dir) -> SyncTalkDataset:
    """Frames 0..N-1 (contiguous), one landmark file each, one image size; crop boxes computed."""
    root = Path(dataset_dir)
    frames_dir = root / FRAMES_DIR
    if not frames_dir.is_dir():
        raise PackageError(f"{root} is not a SyncTalk_2D character directory: {FRAMES_DIR}/ is missing")
    numbered: dict[int, Path] = {}
    for path in frames_dir.iterdir():
        if path.suffix != ".jpg":
            continue
        if not path.stem.isdigit() or str(int(path.stem)) != path.stem:
            raise PackageError(f"{FRAMES_DIR}/{path.name}: frame files must be named 0.jpg, 1.jpg, ...")
        numbered[int(path.stem)] = path
    if not numbered:
        raise PackageError(f"{frames_dir} holds no .jpg frames")
    count = len(numbered)
    for i in range(count):
        if i not in numbered:
            raise PackageError(f"{FRAMES_DIR}/{i}.jpg is missing ({count} frames found, numbered up to {max(numbered)})")
    frame_paths = [numbered[i] for i in range(count)]

    image_size: tuple[int, int] | None = None
    boxes = np.empty((count, 4), dtype=np.int32)
    for i, frame_path in enumerate(frame_paths):
        label = f"{FRAMES_DIR}/{i}.jpg"
        with open(frame_path, "rb") as fh:
            try:
                size = image_dimensions(fh, "jpg")
            except PackageError as exc:
                raise PackageError(f"{label}: {exc}") from None
        if image_size is None:
            image_size = size
        elif size != image_size:
            raise PackageError(f"{label} is {size[0]}x{size[1]} but {FRAMES_DIR}/0.jpg is {image_size[0]}x{image_size[1]}")
        lms_label = f"{LANDMARKS_DIR}/{i}.lms"
        boxes[i] = crop_box(read_landmarks(root / LANDMARKS_DIR / f"{i}.lms", lms_label), size, lms_label)
    assert image_size is not None  # there is at least one frame
    return SyncTalkDataset(root=root, frame_paths=frame_paths, crop_boxes=boxes, image_size=image_size)


def load_checkpoint(path, what: str, strip_prefixes=("module.",)) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth file (no code runs: weights_only), with DataParallel's prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{what} checkpoint {path} does not exist")
    state = load_tensors(path, f"{what} checkpoint {path}", "only tensors are read from checkpoints")
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} checkpoint {path} does not hold a state_dict")
    return normalize_state_dict(state, strip_prefixes)


def ave_features(wav16k: np.ndarray, encoder: AveAudioEncoder) -> np.ndarray:
    """(T, 512) float32 AVE features of a 16 kHz track, unpadded: what SyncTalk_2D saves as aud_ave.npy."""
    windows = torch.from_numpy(audio.mel_windows(audio.melspectrogram(wav16k)))
    encoder.eval()
    with torch.inference_mode():
        out = [encoder(windows[i : i + ENCODER_BATCH]) for i in range(0, len(windows), ENCODER_BATCH)]
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def encode_wav_pcm16(samples: np.ndarray, sample_rate: int = audio.SAMPLE_RATE) -> bytes:
    """Mono float samples in [-1, 1] as 16-bit PCM WAV bytes (x * 32768, so PCM16 sources round-trip exactly)."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return buf.getvalue()


def _read_features(path: Path, mode: str) -> np.ndarray:
    try:
        features = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PackageError(f"{path.name} is not a valid .npy array: {exc}") from None
    dim = feature_dim(mode)
    # SyncTalk_2D's hubert/wenet arrays may keep a per-frame (a, b) layout; its reshape flattens it the same way.
    if mode != "ave" and features.ndim > 2 and features.shape[0] > 0:
        features = features.reshape(features.shape[0], -1)
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != dim:
        raise PackageError(f"{path.name} has shape {features.shape}, expected (T, {dim}) for {mode} mode")
    if features.dtype.kind != "f":
        raise PackageError(f"{path.name} must hold floating-point features, got {features.dtype}")
    return features.astype(np.float32)


def resolve_mode(state: dict[str, torch.Tensor], mode: str | None, what: str) -> tuple[str, int]:
    """(mode, width) of a U-Net state_dict; ``mode`` picks between ave and hubert, which share every shape."""
    inferred, width = infer_unet_config(state)
    if mode is None:
        return inferred, width
    if mode not in AUDIO_FEATURE_SHAPES:
        raise PackageError(f"audio mode {mode!r} is not one of {sorted(AUDIO_FEATURE_SHAPES)}")
    if (mode == "wenet") != (inferred == "wenet"):
        kind = "a wenet" if inferred == "wenet" else "an ave/hubert"
        raise CheckpointError(f"{what} is {kind} U-Net, not {mode}")
    return mode, width


def build_package(dataset_dir, checkpoint, audio_encoder, name: str, out, version: str = "1", mode: str | None = None) -> Manifest:
    """Package a SyncTalk_2D character: its frames (byte-exact), crop boxes, U-Net, AVE encoder, default track.

    ``mode`` defaults to what the checkpoint tells: wenet, else ave (ave and hubert checkpoints cannot be
    told apart; pass "hubert" for those). ``audio_encoder`` (SyncTalk_2D's audio_visual_encoder.pth) is
    required in ave mode. The default track comes from the dataset's feature file for the mode; in ave
    mode, a dataset with aud.wav but no aud_ave.npy gets its features computed with the encoder.
    """
    validate_identifier(name, "package name")  # fail before the slow part
    validate_identifier(version, "package version")
    dataset = read_dataset(dataset_dir)
    unet_state = load_checkpoint(checkpoint, "U-Net")
    mode, width = resolve_mode(unet_state, mode, f"U-Net checkpoint {checkpoint}")

    encoder_state = None
    if audio_encoder is not None:
        encoder_state = load_checkpoint(audio_encoder, "audio encoder", strip_prefixes=("module.", "audio_encoder."))
    elif mode == "ave":
        raise PackageError("ave mode needs the AVE audio encoder checkpoint (audio_visual_encoder.pth)")

    features = None
    features_path = dataset.features_path(mode)
    wav16k = audio.load_audio(str(dataset.audio_path)) if dataset.audio_path else None
    if features_path is not None:
        features = _read_features(features_path, mode)
    elif mode == "ave" and wav16k is not None and encoder_state is not None:  # ave always has one
        log.info("no %s; computing the default track's AVE features from %s", FEATURE_FILES[mode], AUDIO_FILE)
        encoder = AveAudioEncoder()
        load_strict(encoder, encoder_state, "audio encoder")
        features = ave_features(wav16k, encoder)
    default_audio = None
    if wav16k is not None:
        if features is None:
            log.warning("%s skipped: no %s to go with it", AUDIO_FILE, FEATURE_FILES[mode])
        else:
            default_audio = encode_wav_pcm16(wav16k)

    log.info("packaging %d frames (%dx%d), %s mode, width %d", len(dataset.frame_paths), *dataset.image_size, mode, width)
    return write_package(
        out,
        name=name,
        version=version,
        audio_mode=mode,
        model_width=width,
        fps=MODE_FPS[mode],
        frames=[p.read_bytes() for p in dataset.frame_paths],
        frame_ext="jpg",
        crop_boxes=dataset.crop_boxes,
        unet_state=unet_state,
        audio_encoder_state=encoder_state,
        default_features=features,
        default_audio=default_audio,
    )
