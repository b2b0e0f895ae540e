"""``lipsync verify``: the grid holds, pixel for pixel, each sampled frame's template crop and the engine's
prediction for it (and the composited frame when asked), with the frames spread over the chosen track."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from serving_support import speech_pcm16, wav_bytes

from inference_pod.cli import main
from inference_pod.core import audio
from inference_pod.core.engine import Engine
from inference_pod.errors import InvalidInput
from inference_pod.tools.verify import GAP, LABEL_H, TILE, TITLE_H, _fit, sample_frames, verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_character_package) -> Engine:
    return Engine.from_package(demo_character_package)


def tile(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    y = TITLE_H + row * (LABEL_H + TILE + GAP) + LABEL_H
    x = column * (TILE + GAP)
    return grid[y : y + TILE, x : x + TILE]


def test_grid_shows_crops_beside_predictions(demo_package, engine, tmp_path):
    result = verify(demo_package, tmp_path / "grid.png", frames=3)
    grid = cv2.imread(str(result.path))
    assert grid.shape == (TITLE_H + 3 * (LABEL_H + TILE) + 2 * GAP, 2 * TILE + GAP, 3)
    assert result.size == (grid.shape[1], grid.shape[0]) and result.columns == ["template crop", "prediction"]
    track = engine.default_features
    assert len(result.frame_ids) == 3 and result.frame_ids == sorted(set(result.frame_ids))
    assert result.frame_ids[0] == 0 and result.frame_ids[-1] == len(track) - 1  # spread over the whole track
    assert result.template_ids == [engine.template_index(i) for i in result.frame_ids]
    predictions = engine.predict(result.template_ids, engine.windows(track, result.frame_ids))
    for row, (template, prediction) in enumerate(zip(result.template_ids, predictions, strict=True)):
        np.testing.assert_array_equal(tile(grid, row, 0), engine.template_crop(template))
        np.testing.assert_array_equal(tile(grid, row, 1), prediction)
        diff = np.abs(prediction.astype(int) - engine.template_crop(template).astype(int)).mean()
        assert result.mean_abs_diff[row] == pytest.approx(diff)


def test_composited_column(demo_package, engine, tmp_path):
    result = verify(demo_package, tmp_path / "grid.png", frames=2, composite=True)
    grid = cv2.imread(str(result.path))
    assert grid.shape[1] == 3 * TILE + 2 * GAP and result.columns[-1] == "composited"
    track = engine.default_features
    predictions = engine.predict(result.template_ids, engine.windows(track, result.frame_ids))
    for row, (template, prediction) in enumerate(zip(result.template_ids, predictions, strict=True)):
        np.testing.assert_array_equal(tile(grid, row, 2), _fit(engine.composite(template, prediction), TILE))


def test_cli_with_audio(demo_package, tmp_path, capsys):
    pcm = speech_pcm16(2.0)
    wav = tmp_path / "speech.wav"
    wav.write_bytes(wav_bytes(pcm))
    out = tmp_path / "nested" / "grid.png"
    assert main(["verify", str(demo_package), "--audio", str(wav), "--frames", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and printed.count("  frame ") == 4
    grid = cv2.imread(str(out))
    assert grid.shape[0] == TITLE_H + 4 * (LABEL_H + TILE) + 3 * GAP
    # the rows span the audio's track, not the package's 1 s default track
    last = audio.frame_count(len(pcm) // 2) - 1
    assert f"frame {last:5d}" in printed


def test_sample_frames():
    assert sample_frames(27, 6)[0] == 0 and sample_frames(27, 6)[-1] == 26 and len(sample_frames(27, 6)) == 6
    assert sample_frames(3, 6) == [0, 1, 2]
    assert sample_frames(10, 1) == [0]
    with pytest.raises(InvalidInput):
        sample_frames(10, 0)
