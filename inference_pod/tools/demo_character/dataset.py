"""The demo character in SyncTalk_2D's own layout (frames, landmarks, aud.wav, aud_ave.npy) and, through the
real converter, as a character package."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np

from inference_pod.core import audio
from inference_pod.errors import InvalidInput
from inference_pod.package import Manifest
from inference_pod.tools.demo_character.drawing import character_style, draw_frame, mouth_track
from inference_pod.tools.demo_character.voice import speech_like_audio
from inference_pod.tools.demo_character.weights import (
    demo_audio_encoder,
    trained_unet_state,
    write_checkpoints,
)
from inference_pod.tools.synctalk_dataset import (
    AUDIO_FILE,
    FEATURE_FILES,
    FRAMES_DIR,
    LANDMARKS_DIR,
    ave_features,
    build_package,
    encode_wav_pcm16,
)

DEFAULT_SIZE = (256, 256)
MIN_SIZE = 32
JPEG_QUALITY = 92



def write_synctalk_dataset(
    out_dir,
    frames: int | None = 50,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    audio_seconds: float = 3.0,
    speech: np.ndarray | None = None,
) -> Path:
    """Draw the character into ``out_dir`` in SyncTalk_2D's layout; aud_ave.npy uses ``demo_audio_encoder(seed)``.

    The voice is ``speech`` (16 kHz float32, e.g. ``speech_track(...)``) or else ``audio_seconds`` of
    ``speech_like_audio``. Frame i's mouth follows the voice at frame i (as in a filmed character, frame i
    and audio frame i are the same moment); ``frames=None`` draws one frame per frame of the track, and
    frames past the track's end repeat it from the start.
    """
    if frames is not None and frames < 1:
        raise InvalidInput(f"a demo character needs at least one frame, got {frames}")
    width, height = size
    if width < MIN_SIZE or height < MIN_SIZE:
        raise InvalidInput(f"demo frames must be at least {MIN_SIZE}x{MIN_SIZE}, got {width}x{height}")
    wav_bytes = encode_wav_pcm16(speech if speech is not None else speech_like_audio(audio_seconds, seed))
    samples = audio.decode_audio(wav_bytes)  # what is stored (PCM16): the mouth follows what the network hears
    track_frames = audio.frame_count(len(samples))
    mouth = mouth_track(samples, track_frames)
    frames = track_frames if frames is None else frames

    out_dir = Path(out_dir)
    (out_dir / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / LANDMARKS_DIR).mkdir(parents=True, exist_ok=True)
    style = character_style(seed)
    for i in range(frames):
        opening, mouth_width = mouth[i % track_frames]
        image, landmarks = draw_frame(i, (width, height), style, float(opening), float(mouth_width))
        ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode demo frame {i}")
        (out_dir / FRAMES_DIR / f"{i}.jpg").write_bytes(jpg.tobytes())
        (out_dir / LANDMARKS_DIR / f"{i}.lms").write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in landmarks))

    (out_dir / AUDIO_FILE).write_bytes(wav_bytes)
    # Features of the samples as stored (PCM16), the way SyncTalk_2D computes them from aud.wav.
    features = ave_features(samples, demo_audio_encoder(seed))
    np.save(out_dir / FEATURE_FILES["ave"], features, allow_pickle=False)
    return out_dir


def build_demo_package(
    name: str,
    out,
    width: int = 8,
    frames: int | None = 50,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    audio_seconds: float = 3.0,
    version: str = "1",
    speech: np.ndarray | None = None,
    trained: bool = False,
) -> Manifest:
    """Write the demo dataset and checkpoints to a scratch directory and convert them like a real character.

    ``trained`` packs the committed trained U-Net (``TRAINED``: its width, seed and size only) instead of
    seeded random weights.
    """
    unet_state = trained_unet_state(width, seed, size) if trained else None
    with tempfile.TemporaryDirectory(prefix="lipsync-demo-") as tmp:
        dataset = write_synctalk_dataset(
            Path(tmp) / "dataset", frames=frames, size=size, seed=seed, audio_seconds=audio_seconds, speech=speech
        )
        unet_path, encoder_path = write_checkpoints(Path(tmp) / "checkpoints", "ave", width, seed, unet_state)
        return build_package(dataset, unet_path, encoder_path, name, out, version=version, mode="ave")
