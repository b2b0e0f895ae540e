"""A session's audio timeline: the windows it builds are SyncTalk_2D's windows of the same audio as one track,
silence is known without computing it, and a barge-in accounts for every sample."""

from __future__ import annotations

import numpy as np
import pytest

from inference_pod.core import audio
from inference_pod.core.engine import Engine
from inference_pod.core.session_audio import (
    SAMPLES_PER_TICK,
    SessionTimeline,
    frame_support,
    silence_feature,
    tick_samples,
)
from inference_pod.package import open_package
from inference_pod.tools.demo_character import speech_like_audio

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_package, tmp_path_factory) -> Engine:
    return Engine.from_package(open_package(demo_package, cache_dir=tmp_path_factory.mktemp("session-audio")))


def pcm(seconds: float, seed: int) -> np.ndarray:
    return (np.clip(speech_like_audio(seconds, seed), -1, 1) * 32767).astype("<i2")


def compute(timeline: SessionTimeline, frame: int) -> np.ndarray:
    while (job := timeline.feature_job(frame)) is not None:
        timeline.add_features(job())
    return timeline.window(frame)


def test_windows_across_speech_and_silence_are_the_whole_tracks(engine):
    """Speech placed after 1 s of silence, 1 s of silence after it: every window (speech -> silence included)
    is the one SyncTalk_2D computes from the same samples as a whole track, except at the track's very start,
    where a track pads with zeros and a session hears its silent past."""
    speech = pcm(2.0, 3)
    timeline = SessionTimeline(engine, silence_feature(engine))
    timeline.commit_silence(16000)
    start, end = timeline.append(speech.tobytes(), utterance=1)
    assert (start, end) == (16000, 16000 + len(speech))
    timeline.commit_silence(end + 16000)
    whole = engine.track_features(np.concatenate([np.zeros(16000), speech / 32768.0, np.zeros(16000)]))
    frames = range(9, audio.frame_count(timeline.committed) - 9)
    for i in frames:
        np.testing.assert_allclose(compute(timeline, i), engine.windows(whole, [i])[0], atol=1e-4)
    silent = [i for i in frames if timeline.is_silent(i)]
    assert silent and all(frame_support(i)[1] <= start or frame_support(i)[0] >= end for i in silent)
    for i in silent:  # silent frames read the silence window, computed once
        np.testing.assert_allclose(compute(timeline, i), timeline.silence_window(), atol=1e-4)


def test_tick_audio_is_the_input_and_a_barge_in_counts_every_sample(engine):
    timeline = SessionTimeline(engine, silence_feature(engine))
    timeline.commit_silence(3 * SAMPLES_PER_TICK + 100)
    speech = pcm(1.0, 5)
    start, _ = timeline.append(speech.tobytes(), utterance=1)
    timeline.commit_silence(timeline.committed + 5000)
    played_ticks = range(0, 20)
    heard = np.frombuffer(b"".join(timeline.tick_pcm(k) for k in played_ticks), "<i2")
    np.testing.assert_array_equal(heard[start:], speech[: len(heard) - start])
    assert not heard[:start].any()
    played, dropped = timeline.erase(tick_samples(20)[0])
    assert played[1] == tick_samples(20)[0] - start and played[1] + dropped[1] == len(speech)
    assert timeline.committed == tick_samples(20)[0] and all(timeline.is_silent(k) for k in range(0, 40))
    with pytest.raises(audio.AudioError, match="odd"):
        timeline.append(b"\x00\x01\x02", utterance=2)


def test_a_barge_in_counts_the_samples_trim_already_forgot(engine):
    """An utterance that arrived in pieces with gaps: the pieces that played long ago are trimmed from the
    timeline, yet a barge-in still reports them as played (a voice agent truncates its transcript by it)."""
    timeline = SessionTimeline(engine, silence_feature(engine))
    pieces = [pcm(0.5, seed) for seed in (7, 8, 9)]
    for piece in pieces:
        timeline.append(piece.tobytes(), utterance=1)
        timeline.commit_silence(timeline.committed + 8000)  # a half-second gap: separate segments
    at = tick_samples(60)[0]  # 2.4 s: the first two pieces played, the third partly
    timeline.trim(60)
    played, dropped = timeline.erase(at)
    third_start = 2 * (8000 + 8000)
    assert played[1] == 2 * 8000 + (at - third_start)
    assert played[1] + dropped[1] == sum(len(p) for p in pieces)
