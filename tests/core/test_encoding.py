"""Output image encoding: formats, regions, quality, and the inverse used by clients."""

from __future__ import annotations

import numpy as np
import pytest

from inference_pod.core.encoding import OutputSpec, decode_image, encode_image
from inference_pod.errors import InvalidInput


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 40 * 30 * 3).reshape(30, 40, 3)
    return np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)


def test_png_and_raw_are_lossless(image):
    for fmt in ("png", "raw"):
        data = encode_image(image, OutputSpec(format=fmt))
        assert np.array_equal(decode_image(data, fmt, 40, 30), image)
    assert encode_image(image, OutputSpec(format="raw")) == image.tobytes()


def test_jpeg_quality_changes_size_and_stays_close(image):
    high = encode_image(image, OutputSpec(format="jpeg", jpeg_quality=95))
    low = encode_image(image, OutputSpec(format="jpeg", jpeg_quality=20))
    assert high[:2] == b"\xff\xd8" and len(low) < len(high)
    assert np.abs(decode_image(high, "jpeg").astype(int) - image).mean() < 4


def test_cache_keys_distinguish_every_option():
    specs = [OutputSpec(), OutputSpec(jpeg_quality=50), OutputSpec(format="png"), OutputSpec(format="raw"),
             OutputSpec(region="prediction")]
    assert len({s.key for s in specs}) == len(specs)
    assert OutputSpec(format="png", jpeg_quality=50).key == OutputSpec(format="png").key  # quality is JPEG's only


@pytest.mark.parametrize("kwargs", [{"format": "gif"}, {"region": "mouth"}, {"jpeg_quality": 0},
                                    {"jpeg_quality": 101}])
def test_bad_options_are_invalid_input(kwargs):
    with pytest.raises(InvalidInput):
        OutputSpec(**kwargs)


def test_bad_bytes_are_invalid_input():
    with pytest.raises(InvalidInput):
        decode_image(b"not an image", "jpeg")
    with pytest.raises(InvalidInput):
        decode_image(b"\x00" * 10, "raw", 2, 2)


def test_jpeg_restart_markers_change_no_pixel():
    """Every JPEG carries restart markers (for splicing); they decode to what OpenCV's plain JPEG does."""
    import cv2

    rng = np.random.default_rng(1)
    image = np.clip(np.linspace(0, 255, 200 * 333 * 3).reshape(200, 333, 3) + rng.normal(0, 20, (200, 333, 3)),
                    0, 255).astype(np.uint8)
    for quality in (1, 37, 90, 100):
        ours = encode_image(image, OutputSpec(jpeg_quality=quality))
        plain = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        assert b"\xff\xdd" in ours[: ours.index(b"\xff\xda")] and ours != plain  # a restart interval is declared
        assert np.array_equal(decode_image(ours, "jpeg"), decode_image(plain, "jpeg"))
