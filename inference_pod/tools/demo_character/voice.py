"""The demo character's voice: espeak-ng speech (the default track and the training lines), or synthetic
voiced syllables where espeak-ng is missing or a length is asked for."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference_pod.core import audio
from inference_pod.errors import AudioError, InvalidInput

log = logging.getLogger(__name__)

# Vowel formants (F1, F2, F3) in Hz: a, i, u, e, o.
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))



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
