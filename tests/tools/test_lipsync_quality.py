"""The lip-sync quality gate: the trained demo's rendered mouth follows speech it never heard, in time."""

from __future__ import annotations

import numpy as np
import pytest
from serving_support import needs_espeak

from inference_pod.core import audio
from inference_pod.core.engine import CropBox, Engine
from inference_pod.package import open_package
from inference_pod.tools.demo_character import (
    TRAINED,
    build_demo_package,
    character_style,
    default_speech,
    draw_frame,
    mouth_track,
)
from inference_pod.tools.lipsync_quality import (
    MIN_CORRELATION,
    evaluate,
    held_out_speech,
    mouth_opening_pixels,
    sync_score,
)
from inference_pod.tools.synctalk_dataset import crop_box

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sync_score_finds_the_offset_of_a_delayed_signal():
    rng = np.random.default_rng(0)
    truth = np.convolve(rng.normal(size=300), np.ones(5) / 5, mode="same")
    r0, peak, _ = sync_score(truth * 3 + 1, truth)
    assert r0 == pytest.approx(1.0) and peak == 0
    for delay in (2, -3):
        late = np.roll(truth, delay)
        r0, peak, correlations = sync_score(late, truth)
        assert peak == delay and correlations[delay] > 0.99 and r0 < correlations[delay]


@needs_espeak
def test_pixel_measure_reads_the_drawn_mouth():
    """On the drawing itself (no network) the pixel measure follows the drawn opening almost exactly."""
    wav = held_out_speech()
    n = audio.frame_count(len(wav))
    mouth = mouth_track(wav, n)
    style = character_style(TRAINED.seed)
    counts = []
    for i in range(n):
        frame, landmarks = draw_frame(i, TRAINED.size, style, float(mouth[i, 0]), float(mouth[i, 1]))
        x1, y1, x2, y2 = crop_box(landmarks, TRAINED.size)
        counts.append(mouth_opening_pixels(frame, CropBox(x1, y1, x2, y2, x2 - x1)))
    counts = np.array(counts)
    assert counts.max() > 2.5 * counts[mouth[:, 0] < 0.02].max()  # closed: only the lips and the nose
    r0, peak, _ = sync_score(counts, mouth[:, 0])
    assert r0 > 0.97 and peak == 0


@pytest.fixture(scope="module")
def trained_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained-demo")
    build_demo_package("demo", out / "demo.zip", width=TRAINED.width, speech=default_speech(), trained=True)
    return Engine.from_package(open_package(out / "demo.zip", cache_dir=out / "store"))


@needs_espeak
def test_trained_demo_passes_the_gate_on_held_out_speech(trained_engine):
    report = evaluate(trained_engine, held_out_speech())
    print(report.summary())
    assert report.correlation >= MIN_CORRELATION, report.summary()
    assert report.peak_offset == 0, report.summary()
    assert report.passes()


@needs_espeak
@pytest.mark.parametrize("shift", [2, -2])
def test_audio_two_frames_off_fails_the_gate(trained_engine, shift):
    report = evaluate(trained_engine, held_out_speech(), shift_frames=shift)
    print(f"shifted {shift:+d} frames: {report.summary()}")
    assert report.peak_offset == shift, report.summary()
    assert not report.passes()


@needs_espeak
def test_untrained_weights_fail_the_gate(tmp_path):
    build_demo_package("demo", tmp_path / "random.zip", width=TRAINED.width, speech=default_speech(), trained=False)
    engine = Engine.from_package(open_package(tmp_path / "random.zip", cache_dir=tmp_path / "store"))
    report = evaluate(engine, held_out_speech())
    print(report.summary())
    assert not report.passes()
