"""Live audio: frames become ready as their audio windows complete, with the same windows as the whole track."""

from __future__ import annotations

import numpy as np
import pytest
from serving_support import speech_pcm16

from inference_pod.core import audio
from inference_pod.core.engine import Engine
from inference_pod.core.live_features import LiveTrack
from inference_pod.errors import AudioError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_character_package) -> Engine:
    return Engine.from_package(demo_character_package)


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return speech_pcm16(2.3)


def offline_windows(engine: Engine, pcm: bytes, rate: int = 16000, channels: int = 1) -> np.ndarray:
    features = engine.track_features(audio.pcm16_to_float(pcm, rate, channels))
    return engine.windows(features, list(range(len(features))))


def stream(engine: Engine, pcm: bytes, chunk_bytes: int, rate: int = 16000, channels: int = 1):
    live = LiveTrack(engine, rate, channels)
    out = []
    for start in range(0, len(pcm), chunk_bytes):
        out += live.push(pcm[start : start + chunk_bytes])
    out += live.finish()
    return out, live


@pytest.mark.parametrize("chunk_bytes", [333, 1280, 9600, 1 << 20])  # odd sizes split samples across chunks
def test_live_windows_equal_the_whole_tracks(engine, pcm, chunk_bytes):
    expected = offline_windows(engine, pcm)
    out, _ = stream(engine, pcm, chunk_bytes)
    assert [frame_id for frame_id, _ in out] == list(range(len(expected)))
    # The AVE encoder sees different batch sizes here than offline: equal up to float rounding.
    np.testing.assert_allclose(np.stack([w for _, w in out]), expected, atol=1e-4)


def test_frames_are_ready_as_soon_as_their_audio_is(engine, pcm):
    """Frame i needs raw feature i+6: mel frames from int(3.2 (i+6)) for 16 frames, the last of which reads
    samples up to 200 (its index) + 400."""
    live = LiveTrack(engine, 16000)
    emitted = []
    step = 160  # 10 ms chunks
    for start in range(0, len(pcm), 2 * step):
        emitted += [frame_id for frame_id, _ in live.push(pcm[start : start + 2 * step])]
        received = min(len(pcm) // 2, start // 2 + step)
        due = [i for i in range(len(pcm) // 640) if (16 * (i + 6) // 5 + 15) * 200 + 400 <= received]
        assert emitted == due, f"after {received} samples"
    assert live.buffered_seconds < 0.5


def test_resampled_stereo_input(engine):
    rate = 44100
    mono = speech_pcm16(1.5, seed=3)
    samples = np.frombuffer(mono, "<i2")
    up = np.interp(np.arange(int(len(samples) * rate / 16000)) * 16000 / rate, np.arange(len(samples)), samples)
    stereo = np.stack([up, up], axis=1).astype("<i2").tobytes()
    expected = offline_windows(engine, stereo, rate, 2)
    out, _ = stream(engine, stereo, 4 * 441, rate, 2)  # 10 ms chunks
    assert [frame_id for frame_id, _ in out] == list(range(len(expected)))
    # Streaming and one-shot resampling differ only at chunk edges: features stay close.
    got = np.stack([w for _, w in out])
    assert np.abs(got - expected).max() < 0.05 * max(1.0, np.abs(expected).max())


def test_long_streams_keep_bounded_memory(engine):
    live = LiveTrack(engine, 16000)
    second = speech_pcm16(1.0, seed=9)
    frames = 0
    for _ in range(8):
        frames += len(live.push(second))
    assert frames >= 8 * 25 - 12
    assert live.buffered_seconds < 0.5
    assert live.buffered_features <= 2 * audio.FEATURE_CONTEXT + 1


def test_stream_errors(engine):
    with pytest.raises(AudioError, match="sample rate"):
        LiveTrack(engine, 100)
    with pytest.raises(AudioError, match="channel"):
        LiveTrack(engine, 16000, 0)
    short = LiveTrack(engine, 16000)
    short.push(b"\x00\x01" * 100)
    with pytest.raises(AudioError, match="too short"):
        short.finish()
    stray = LiveTrack(engine, 16000)
    stray.push(speech_pcm16(0.5) + b"\x01")
    with pytest.raises(AudioError, match="stray"):
        stray.finish()
    done = LiveTrack(engine, 16000)
    done.push(speech_pcm16(0.5))
    assert done.finish() and done.finish() == []
    with pytest.raises(AudioError, match="ended"):
        done.push(b"\x00\x00")


@pytest.mark.parametrize("extra_hops", range(16))  # window starts repeat every 16 mel frames (5 windows)
def test_every_track_length_ends_with_the_whole_tracks_windows(engine, extra_hops):
    """At the end of a stream, windows past the end shift back to the last 16 mel frames: audio kept for them
    must reach back that far, whatever the length (one length in 16 once lost it and failed the stream)."""
    pcm = speech_pcm16(2.0)[: 2 * (24_000 + audio.HOP * extra_hops + 37)]
    expected = offline_windows(engine, pcm)
    out, _ = stream(engine, pcm, 1280)  # 40 ms chunks, as the live page sends
    assert [frame_id for frame_id, _ in out] == list(range(len(expected)))
    np.testing.assert_allclose(np.stack([w for _, w in out]), expected, atol=1e-4)


@pytest.mark.parametrize("pcm, rate", [(b"", 16000), (b"\x00\x00" * 2999, 16000), (b"\x00\x00" * 4000, 7999)],
                         ids=["empty", "too-short", "bad-rate"])
def test_a_live_stream_refuses_audio_in_the_words_a_whole_track_does(engine, pcm, rate):
    from inference_pod.serving.pipeline import AudioInput

    with pytest.raises(AudioError) as whole:  # what GenerateFrame does with PCM16 audio
        engine.track_features(AudioInput(pcm, "pcm16", rate, 1).decode())
    with pytest.raises(AudioError) as live:
        track = LiveTrack(engine, rate)
        track.push(pcm)
        track.finish()
    assert str(live.value) == str(whole.value)
