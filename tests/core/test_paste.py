"""How a prediction goes back into its frame: SyncTalk_2D's exact paste (the default, byte for byte) and the
optional feathered paste, measured on the trained demo character, whose crop box shows as a line with the
exact paste."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inference_pod.core.encoding import OutputSpec, encode_image
from inference_pod.core.engine import FEATHER_PIXELS, INNER, MASK_RECT, Engine, feather_weights
from inference_pod.errors import InvalidInput
from inference_pod.package import extract_package

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = list(range(0, 40, 5))  # mouths closed and open, templates from both ends of the walk


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """The trained demo character (committed weights, the size and seed they were trained for), 20 templates."""
    from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech

    out = tmp_path_factory.mktemp("trained") / "demo.zip"
    build_demo_package("demo", out, width=TRAINED.width, frames=20, seed=TRAINED.seed, size=TRAINED.size,
                       speech=default_speech(), trained=True)
    return extract_package(out, tmp_path_factory.mktemp("trained-x") / "demo")


@pytest.fixture(scope="module")
def engines(trained_demo):
    return {paste: Engine.from_package(trained_demo, max_batch=8, paste=paste) for paste in ("exact", "feather")}


@pytest.fixture(scope="module")
def predictions(engines):
    engine = engines["exact"]
    templates = [engine.template_index(i) for i in FRAMES]
    return list(zip(templates, engine.predict(templates, engine.windows(engine.default_features, FRAMES)), strict=True))


def seams(frame: np.ndarray, template: np.ndarray, box) -> dict[str, float]:
    """Per side of the crop box, how much sharper the frame's change from one row (column) to the next is
    than its template's, at the worst row (column) of a band across that side: a line along the box is a
    jump there that the template does not have. The band spans the box's edge and the mouth mask's edge."""
    f, t = frame.astype(np.int16), template.astype(np.int16)
    across_rows = np.abs(np.diff(f, axis=0)).mean(axis=2) - np.abs(np.diff(t, axis=0)).mean(axis=2)
    across_cols = np.abs(np.diff(f, axis=1)).mean(axis=2) - np.abs(np.diff(t, axis=1)).mean(axis=2)
    band = 8  # frame pixels: the demo's 133-pixel box puts the mask's edge 3-4 pixels in
    x1, y1, x2, y2 = box.x1, box.y1, box.x2, box.y2
    return {
        "top": across_rows[y1 - 1 : y1 + band, x1:x2].mean(axis=1).max(),
        "bottom": across_rows[y2 - band - 1 : y2, x1:x2].mean(axis=1).max(),
        "left": across_cols[y1:y2, x1 - 1 : x1 + band].mean(axis=0).max(),
        "right": across_cols[y1:y2, x2 - band - 1 : x2].mean(axis=0).max(),
    }


def mean_seams(engine: Engine, predictions) -> dict[str, float]:
    per_frame = [seams(engine.composite(t, p), engine._frames.get(t), engine.crop_box(t)) for t, p in predictions]
    return {side: float(np.mean([s[side] for s in per_frame])) for side in per_frame[0]}


def test_the_exact_paste_of_the_trained_demo_shows_its_crop_box(engines, predictions):
    """The line the feathered paste exists for: at the top of the box (nose height), the network's edge
    jumps by more than 8 gray levels from one row to the next where the template is smooth."""
    assert mean_seams(engines["exact"], predictions)["top"] > 8


def test_the_feathered_paste_leaves_no_line_at_the_crop_box(engines, predictions):
    seam = mean_seams(engines["feather"], predictions)
    assert max(seam.values()) < 1.5, seam


def test_the_default_paste_is_synctalks_exact_paste_byte_for_byte(trained_demo, engines, predictions):
    """The default frame is the prediction written into the template's 328 crop at [4:324, 4:324] and
    resized (bicubic) into the crop box, as SyncTalk_2D does; its JPEG is that frame's encoding."""
    default = Engine.from_package(trained_demo, max_batch=8)
    for t, prediction in predictions:
        box = default.crop_box(t)
        expected = default._frames.get(t).copy()
        crop = cv2.resize(expected[box.y1 : box.y2, box.x1 : box.x2], (328, 328), interpolation=cv2.INTER_CUBIC)
        crop[4:324, 4:324] = prediction
        expected[box.y1 : box.y2, box.x1 : box.x2] = cv2.resize(crop, (box.x2 - box.x1, box.y2 - box.y1),
                                                                 interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(default.composite(t, prediction), expected)
        assert np.array_equal(engines["exact"].composite(t, prediction), expected)
        jpeg = encode_image(expected, OutputSpec(jpeg_quality=90))
        for _ in range(2):  # the first whole, then spliced where the box allows
            assert default.full_frame_jpeg(t, prediction, 90).data == jpeg


def test_feather_weights_keep_the_ring_the_network_sees_and_the_mouth_it_makes():
    weights = feather_weights()
    x, y, w, h = MASK_RECT
    inside = np.zeros(weights.shape, bool)
    inside[y : y + h, x : x + w] = True
    assert weights.shape == (320, 320) and weights.dtype == np.float32
    assert np.all(weights[~inside] == 0)  # the unmasked ring: the template's own pixels
    assert np.all(weights[inside] > 0)
    core = weights[y + FEATHER_PIXELS : y + h - FEATHER_PIXELS, x + FEATHER_PIXELS : x + w - FEATHER_PIXELS]
    assert np.all(core == 1)  # the mouth: the network's, untouched
    row = weights[160, : x + FEATHER_PIXELS + 1]
    assert np.all(np.diff(row) >= 0) and row[-1] == 1  # rising steadily from the ring inward


def test_the_feathered_paste_changes_only_the_band_along_the_box(engines, predictions):
    exact, feather = engines["exact"], engines["feather"]
    for t, prediction in predictions:
        box = exact.crop_box(t)
        a, b = exact.composite(t, prediction), feather.composite(t, prediction)
        outside = np.ones(a.shape[:2], bool)
        outside[box.y1 : box.y2, box.x1 : box.x2] = False
        assert np.array_equal(a[outside], b[outside]) and np.array_equal(b[outside], exact._frames.get(t)[outside])
        # crop pixels past the ramp (and the bicubic kernel's reach) map to identical frame pixels
        scale = (box.x2 - box.x1) / 328
        margin = int(np.ceil((INNER.start + MASK_RECT[0] + FEATHER_PIXELS + 2) * scale)) + 1
        core = (slice(box.y1 + margin, box.y2 - margin), slice(box.x1 + margin, box.x2 - margin))
        assert np.array_equal(a[core], b[core])
        assert not np.array_equal(a, b)


def test_feathered_full_frame_jpegs_are_the_encoded_feathered_frames(engines, predictions):
    engine = engines["feather"]
    for t, prediction in predictions[:3]:
        expected = encode_image(engine.composite(t, prediction), OutputSpec(jpeg_quality=75))
        assert [engine.full_frame_jpeg(t, prediction, 75).data for _ in range(2)] == [expected, expected]


def test_an_unknown_paste_is_refused_in_one_line(trained_demo):
    with pytest.raises(InvalidInput, match=r"^paste must be one of exact, feather, got 'soft'$"):
        Engine.from_package(trained_demo, paste="soft")
