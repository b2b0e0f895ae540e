"""The synthetic demo character: drawn frames, plausible landmarks, a voice track, seeded or trained weights.

It is written in SyncTalk_2D's own layout (full_body_img/, landmarks/, aud.wav, aud_ave.npy, .pth
checkpoints) and packaged through the real converter, so a demo package exercises the same path as a
trained character. Everything is a pure function of the seed (and of the speech): same inputs, same bytes.

The drawn mouth follows the voice: frame i's opening comes from the loudness of the audio around frame
i's time and its width from the balance of high to low speech bands (see ``mouth_track``). Audio -> mouth
is therefore a function the U-Net can learn from the audio window it sees, which is what ``lipsync
train`` does; the weights trained that way ship in inference_pod/assets/ (``TRAINED``).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from inference_pod.core import audio
from inference_pod.core.model import AveAudioEncoder, LipSyncUNet, random_weights
from inference_pod.errors import AudioError, InvalidInput
from inference_pod.package import Manifest
from inference_pod.tools.synctalk_dataset import (
    AUDIO_FILE,
    FEATURE_FILES,
    FRAMES_DIR,
    LANDMARKS_DIR,
    ave_features,
    build_package,
    encode_wav_pcm16,
    load_checkpoint,
)

log = logging.getLogger(__name__)

DEMO_FPS = 25
DEFAULT_SIZE = (256, 256)
MIN_SIZE = 32
SHIFT = 4  # OpenCV drawing with 1/16-pixel coordinates, so slow head motion stays smooth
JPEG_QUALITY = 92
MOUTH_INTERIOR = (30, 20, 50)  # BGR: the dark inside of the open mouth (lipsync_quality measures it)
UNET_FILE = "unet.pth"
AUDIO_ENCODER_FILE = "audio_visual_encoder.pth"
# Vowel formants (F1, F2, F3) in Hz: a, i, u, e, o.
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))


@dataclass(frozen=True)
class _Style:
    """Per-seed look and motion of the character."""

    background_top: np.ndarray
    background_bottom: np.ndarray
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    iris: tuple[float, float, float]
    phases: np.ndarray  # head x, head y, mouth slow, mouth fast, blink


def _style(seed: int) -> _Style:
    rng = np.random.default_rng(seed)
    skin = rng.uniform([120, 150, 190], [170, 190, 235])  # BGR
    return _Style(
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
    index: int, size: tuple[int, int], style: _Style, opening: float = 0.0, mouth_width: float = 1.0
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


def speech_like_audio(seconds: float, seed: int) -> np.ndarray:
    """16 kHz mono float32: voiced syllables (harmonics shaped by vowel formants, gliding pitch) and pauses."""
    if seconds * audio.SAMPLE_RATE < audio.MIN_SAMPLES:
        raise InvalidInput(f"demo audio must last at least {audio.MIN_SAMPLES / audio.SAMPLE_RATE:.2f} s, got {seconds}")
    rng = np.random.default_rng([seed, 1])
    sr = audio.SAMPLE_RATE
    out = np.zeros(int(seconds * sr), dtype=np.float64)
    pos = int(0.12 * sr)
    while pos < out.size - int(0.1 * sr):
        n = min(int(rng.uniform(0.12, 0.32) * sr), out.size - pos)
        t = np.arange(n) / sr
        f0 = rng.uniform(100, 210) * (1 + rng.uniform(-0.15, 0.15) * t / t[-1])
        phase = 2 * np.pi * np.cumsum(f0) / sr
        formants = np.array(VOWELS[rng.integers(len(VOWELS))], dtype=np.float64)
        voiced = np.zeros(n)
        for k in range(1, int(7000 / f0.max()) + 1):
            freq = k * f0.mean()
            gain = np.sum(np.exp(-(((freq - formants) / (0.08 * formants + 60)) ** 2)) * (1.0, 0.6, 0.3)) + 0.02
            voiced += gain / k**0.5 * np.sin(k * phase)
        envelope = np.sin(np.pi * np.arange(n) / n) ** 0.6
        onset = rng.normal(0, 0.15, n) * np.exp(-t / 0.015)  # a consonant-like burst
        out[pos : pos + n] += voiced * envelope + onset
        gap = rng.uniform(0.3, 0.55) if rng.random() < 0.2 else rng.uniform(0.02, 0.08)
        pos += n + int(gap * sr)
    return (0.6 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


@dataclass(frozen=True)
class Utterance:
    """One line spoken by espeak-ng: text, voice, rate (words per minute) and pitch (0-99)."""

    text: str
    voice: str = "en-us"
    rate: int = 160
    pitch: int = 50


# The demo's default track: what `make demo` says.
DEFAULT_SPEECH = (Utterance("Hello! I am the demo character. Watch my mouth: it follows every word I say.", "en-us", 150, 50),)
# The training speech: varied voices, rates and pitches. The quality gate speaks other text in another voice.
TRAINING_SPEECH = (
    Utterance("The quick brown fox jumps over the lazy dog, and then it runs away.", "en-us", 150, 50),
    Utterance("Open wide, say aah. Now close your mouth and hum quietly.", "en-gb", 130, 35),
    Utterance("Seven silver spoons were sitting on a shelf above the sink.", "en-us+f3", 175, 70),
    Utterance("Would you like a cup of tea, or perhaps some cool water?", "en-gb-x-rp", 120, 45),
    Utterance("Bright lights flicker over the harbour while boats drift home.", "en-029", 165, 60),
    Utterance("One, two, three, four, five. Counting slowly makes the mouth move.", "en-us", 110, 30),
    Utterance("Every morning I walk along the river and watch the ducks.", "en-gb", 185, 55),
    Utterance("Papa bought a big blue balloon, but it popped at noon.", "en-us+f3", 140, 80),
    Utterance("Hello! I am the demo character. Watch my mouth: it follows every word I say.", "en-us", 150, 50),
)
PAUSE_S = 0.4  # silence between utterances: the mouth must learn to close too


def espeak(utterance: Utterance) -> np.ndarray:
    """16 kHz mono float32 speech from espeak-ng (which must be on PATH: apt-get install espeak-ng)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise InvalidInput("espeak-ng is not installed: apt-get install espeak-ng (make setup does it)")
    cmd = [exe, "--stdout", "-v", utterance.voice, "-s", str(utterance.rate), "-p", str(utterance.pitch), utterance.text]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise AudioError(f"espeak-ng failed for voice {utterance.voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    return audio.decode_audio(proc.stdout)


def speech_track(utterances: Sequence[Utterance], pause_s: float = PAUSE_S) -> np.ndarray:
    """The utterances spoken one after another, with ``pause_s`` of silence before each and at the end."""
    gap = np.zeros(int(pause_s * audio.SAMPLE_RATE), dtype=np.float32)
    parts = [gap]
    for utterance in utterances:
        parts += [espeak(utterance), gap]
    return np.concatenate(parts)


def default_speech(audio_seconds: float | None = None, seed: int = 0) -> np.ndarray:
    """The demo's voice: DEFAULT_SPEECH from espeak-ng, or ``audio_seconds`` (default 3) of synthetic syllables
    when asked for a length or when espeak-ng is not installed."""
    if audio_seconds is None and shutil.which("espeak-ng") is not None:
        return speech_track(DEFAULT_SPEECH)
    if audio_seconds is None:
        log.warning("espeak-ng is not installed (apt-get install espeak-ng): the demo speaks synthetic syllables")
    return speech_like_audio(3.0 if audio_seconds is None else audio_seconds, seed)


def demo_unet(mode: str = "ave", width: int = 8, seed: int = 0) -> LipSyncUNet:
    return random_weights(LipSyncUNet(mode, width), seed)


def demo_audio_encoder(seed: int = 0) -> AveAudioEncoder:
    return random_weights(AveAudioEncoder(), seed + 1)


@dataclass(frozen=True)
class TrainedDemo:
    """The committed trained U-Net and the character it was trained for (its look is a function of seed and size)."""

    path: Path
    width: int
    seed: int
    size: tuple[int, int]


TRAINED = TrainedDemo(Path(__file__).parent.parent / "assets" / "demo_unet_w4.pth", width=4, seed=0, size=(256, 256))


def trained_unet_state(width: int, seed: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The committed trained weights, refused for a character they were not trained on."""
    if (width, seed, tuple(size)) != (TRAINED.width, TRAINED.seed, TRAINED.size):
        raise InvalidInput(
            f"the trained demo weights are for width {TRAINED.width}, seed {TRAINED.seed}, "
            f"{TRAINED.size[0]}x{TRAINED.size[1]} frames; got width {width}, seed {seed}, {size[0]}x{size[1]}: "
            "use those, or ask for random weights (--random-weights)"
        )
    if not TRAINED.path.is_file():
        raise InvalidInput(f"{TRAINED.path} is missing: regenerate it with `make demo-weights`")
    return load_checkpoint(TRAINED.path, "trained demo U-Net")


def write_checkpoints(out_dir, mode: str = "ave", width: int = 8, seed: int = 0, unet_state=None) -> tuple[Path, Path]:
    """Seeded U-Net (or ``unet_state``) and AVE encoder as SyncTalk_2D writes them: torch.save(state_dict)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_path, encoder_path = out_dir / UNET_FILE, out_dir / AUDIO_ENCODER_FILE
    torch.save(unet_state if unet_state is not None else demo_unet(mode, width, seed).state_dict(), unet_path)
    torch.save(demo_audio_encoder(seed).state_dict(), encoder_path)
    return unet_path, encoder_path


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
    style = _style(seed)
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
