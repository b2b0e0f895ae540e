"""Restart-marker splicing: a spliced frame is, byte for byte, the JPEG of the whole composited frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_pod.core.jpeg_splice import (
    MAX_REGION_FRACTION,
    MIN_SEGMENT_PX,
    SUBSAMPLINGS,
    FrameGrid,
    RegionBorder,
    ScanSegments,
    TemplateScans,
    encode_jpeg,
    splice,
)


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: every coefficient band carries something, as in a real frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width, 1), yy * 255 / max(height, 1), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _spliced_and_whole(width, height, box, quality, subsampling, seed=0):
    """(spliced bytes, bytes of the whole composited frame) for a prediction pasted into ``box``."""
    x1, y1, x2, y2 = box
    grid = FrameGrid(width, height, subsampling)
    settings_ = grid.settings(quality)
    frame = _picture(width, height, seed)
    template = ScanSegments(encode_jpeg(frame, settings_), grid.segments)
    prediction = _picture(x2 - x1, y2 - y1, seed + 1)[:, ::-1]  # unlike what it replaces
    composited = frame.copy()
    composited[y1:y2, x1:x2] = prediction
    region = grid.region(x1, y1, x2, y2, max_fraction=1.0)  # exactness holds for any region
    # The region as the engine builds it: the template's border strips around the box, the prediction inside
    part, box_pixels = RegionBorder(frame, region, box).canvas()
    box_pixels[...] = prediction
    assert np.array_equal(part, composited[region.y0 : region.y1, region.x0 : region.x1])
    return splice(template, encode_jpeg(part, settings_), grid, region), encode_jpeg(composited, settings_)


def _boxes(width: int, height: int, side_x: int, side_y: int) -> dict[str, tuple[int, int, int, int]]:
    """A box at each corner, the middle of each edge and the centre."""
    xs = {"left": 0, "centre": (width - side_x) // 2, "right": width - side_x}
    ys = {"top": 0, "middle": (height - side_y) // 2, "bottom": height - side_y}
    return {f"{yn}-{xn}": (x, y, x + side_x, y + side_y) for xn, x in xs.items() for yn, y in ys.items()}


SIZES = [(256, 256), (321, 203), (97, 61), (640, 33), (1000, 17)]


@pytest.mark.parametrize("subsampling", sorted(SUBSAMPLINGS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spliced_bytes_equal_the_whole_frame_at_every_edge_and_corner(size, subsampling):
    width, height = size
    side_x, side_y = max(1, width // 4 + 3), max(1, height // 4 + 1)  # odd sides: boxes end off the MCU grid
    for name, box in _boxes(width, height, side_x, side_y).items():
        spliced, whole = _spliced_and_whole(width, height, box, 87, subsampling)
        assert spliced == whole, f"{name} box {box} in {width}x{height} {subsampling}"
        decoded = cv2.imdecode(np.frombuffer(spliced, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(decoded, cv2.imdecode(np.frombuffer(whole, np.uint8), cv2.IMREAD_COLOR))


@pytest.mark.parametrize("subsampling", sorted(SUBSAMPLINGS))
def test_every_quality_a_request_can_ask(subsampling):
    for quality in range(1, 101):  # OutputSpec allows 1..100
        spliced, whole = _spliced_and_whole(150, 70, (37, 20, 70, 51), quality, subsampling, seed=quality)
        assert spliced == whole, f"quality {quality}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_spliced_bytes_equal_the_whole_frame_for_any_box(data):
    width = data.draw(st.integers(8, 400), label="width")
    height = data.draw(st.integers(8, 300), label="height")
    subsampling = data.draw(st.sampled_from(sorted(SUBSAMPLINGS)), label="subsampling")
    quality = data.draw(st.integers(1, 100), label="quality")
    x1 = data.draw(st.integers(0, width - 1), label="x1")
    y1 = data.draw(st.integers(0, height - 1), label="y1")
    x2 = data.draw(st.integers(x1 + 1, width), label="x2")
    y2 = data.draw(st.integers(y1 + 1, height), label="y2")
    spliced, whole = _spliced_and_whole(width, height, (x1, y1, x2, y2), quality, subsampling)
    assert spliced == whole


def test_restart_interval_tiles_rows_with_segments_at_least_min_width():
    for width in (8, 256, 320, 1280, 1920, 1921, 2032):
        grid = FrameGrid(width, 64)
        assert grid.mcu_cols % grid.restart_mcus == 0
        assert grid.restart_mcus * grid.mcu[0] >= MIN_SEGMENT_PX or grid.restart_mcus == grid.mcu_cols
    assert FrameGrid(1920, 1080).restart_mcus == 4  # 64-px segments, 30 to a row
    assert FrameGrid(2032, 64).restart_mcus == 127  # 127 MCUs (prime): one segment a row


def test_region_covers_the_box_on_whole_segments_and_gives_up_when_too_big():
    grid = FrameGrid(1920, 1080)
    region = grid.region(800, 300, 1201, 701)
    assert (region.x0, region.y0, region.x1, region.y1) == (768, 288, 1216, 704)
    assert region.segments == (region.row1 - region.row0) * (region.seg1 - region.seg0) == 26 * 7
    assert grid.region(0, 0, 1920, 1080) is None
    assert grid.region(0, 0, 1920, int(1080 * MAX_REGION_FRACTION) + 16) is None
    assert grid.region(-1, 0, 10, 10) is None and grid.region(0, 0, 1921, 10) is None


def test_a_template_that_differs_outside_the_region_is_not_what_splicing_reproduces():
    """The property the cache relies on is real: change a pixel outside the region and the bytes differ."""
    grid = FrameGrid(256, 256)
    settings_ = grid.settings(90)
    frame = _picture(256, 256, 0)
    region = grid.region(96, 96, 160, 160)
    other = frame.copy()
    other[0, 0] = 255 - other[0, 0]
    template = ScanSegments(encode_jpeg(other, settings_), grid.segments)
    part = frame[region.y0 : region.y1, region.x0 : region.x1]
    assert splice(template, encode_jpeg(part, settings_), grid, region) != encode_jpeg(frame, settings_)


def test_scan_segments_rejects_what_it_cannot_cut():
    grid = FrameGrid(64, 64)
    data = encode_jpeg(_picture(64, 64, 0), grid.settings(80))
    with pytest.raises(ValueError, match="restart segments"):
        ScanSegments(data, grid.segments + 1)
    with pytest.raises(ValueError, match="not a complete JPEG"):
        ScanSegments(data[:-5], grid.segments)
    no_restarts = cv2.imencode(".jpg", _picture(64, 64, 0))[1].tobytes()
    with pytest.raises(ValueError, match="restart segments"):
        ScanSegments(no_restarts, grid.segments)


def test_template_scans_stay_within_their_budget_and_keep_hitting_when_templates_outgrow_it():
    grid = FrameGrid(64, 64)
    scans = [ScanSegments(encode_jpeg(_picture(64, 64, i), grid.settings(90)), grid.segments) for i in range(12)]
    largest = max(s.nbytes for s in scans)
    cache = TemplateScans(budget_bytes=4 * largest)
    hits = 0
    for _ in range(20):  # frames cycle through 12 templates; about 4 fit
        for t, scan in enumerate(scans):
            if cache.get((t, 90)) is scan:
                hits += 1
            else:
                cache.put((t, 90), scan)
            assert cache.nbytes <= cache.budget_bytes
    assert cache.nbytes == sum(scans[t].nbytes for t in range(12) if cache.get((t, 90)) is not None)
    assert hits > 20 * 12 // 10  # least-recently-used eviction would never hit here
    assert hits >= 19 * 3  # a stable set of those that fit hits on every round after the first
    stale = TemplateScans(budget_bytes=2 * largest)  # a set nobody asks for any more makes way
    stale.put((0, 50), scans[0])
    stale.put((1, 50), scans[1])
    for _ in range(TemplateScans.STALE_ROUNDS * 2 + 1):
        stale.get((2, 90))
    stale.put((2, 90), scans[2])
    assert stale.get((2, 90)) is scans[2] and stale.nbytes <= stale.budget_bytes
    small = TemplateScans(budget_bytes=10)
    small.put((3, 90), scans[3])  # larger than the whole budget: not kept
    assert len(small) == 0 and small.nbytes == 0
