"""From a prediction to a full frame: the 320x320 prediction pasted into its template's 328 crop, resized
back into the crop box (bicubic), and the full-frame JPEG, spliced from the template's own encoding where
the crop box allows (see jpeg_splice).

How the prediction meets its template is the paste mode (PASTE_MODES). "exact", the default, is
SyncTalk_2D's: the prediction replaces the crop's whole 320x320 region, so wherever the network does not
reproduce the template along the region's edge, the crop box shows as a line in the frame. "feather" keeps
the template where the network was shown it (the ring around the mouth mask) and fades the prediction in
over FEATHER_PIXELS inside the mask, so no edge is left to see; frames then differ from SyncTalk_2D's.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from inference_pod.core.engine.network import mouth_mask
from inference_pod.core.engine.template_store import INNER, TemplateStore
from inference_pod.core.jpeg_splice import (
    ScanSegments,
    TemplateScans,
    encode_jpeg,
    frame_grid,
    jpeg_settings,
    splice,
    thread_scratch,
)
from inference_pod.core.model import CROP_SIZE
from inference_pod.core.templates import PASTE_MODES
from inference_pod.errors import InvalidInput

# Template encodings kept for splicing full-frame JPEGs: about 200 KB per 1080p template and quality.
DEFAULT_JPEG_CACHE_BYTES = 256 << 20

# How far inside the mouth mask the prediction reaches full weight, in 328-crop pixels (measured on the
# trained demo: the network's own edge reaches about 12 pixels in; 16 leaves no step above the template's).
FEATHER_PIXELS = 16


def feather_weights(pixels: int = FEATHER_PIXELS) -> np.ndarray:
    """(320, 320) float32 weight of the prediction: 0 on the ring the network sees unmasked (there the
    template is the answer it was given), rising linearly to 1 at ``pixels`` inside the mouth mask."""
    inside = (mouth_mask() == 0).astype(np.uint8)
    distance = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # 1 on the mask's first row
    return np.clip(distance / pixels, 0.0, 1.0).astype(np.float32)


class Feather:
    """The feathered paste's blend, done only where it changes something: four strips along the region's
    sides (the weights are 1 on the rectangle inside them, and there the prediction is already in place)."""

    def __init__(self, weights: np.ndarray):
        rows, cols = np.nonzero(weights == 1)
        y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        size = weights.shape[0]
        self.strips = [(slice(0, y0), slice(0, size)), (slice(y1, size), slice(0, size)),
                       (slice(y0, y1), slice(0, x0)), (slice(y0, y1), slice(x1, size))]
        self._weights = [(np.ascontiguousarray(weights[s]), np.ascontiguousarray(1.0 - weights[s]))
                         for s in self.strips]

    def blend(self, prediction: np.ndarray, template: np.ndarray, dst: np.ndarray) -> None:
        """``dst`` (holding ``prediction``) gets the template faded in along its sides."""
        for strip, (ours, theirs) in zip(self.strips, self._weights, strict=True):
            view = dst[strip]
            out = cv2.blendLinear(prediction[strip], template[strip], ours, theirs, dst=view)
            if out is not view:  # a layout OpenCV could not write into: copy
                view[...] = out


def check_paste(paste: str) -> str:
    if paste not in PASTE_MODES:
        raise InvalidInput(f"paste must be one of {', '.join(PASTE_MODES)}, got {paste!r}")
    return paste


@dataclass(frozen=True)
class FullFrameJpeg:
    data: bytes
    width: int
    height: int
    path: str  # "spliced" or "plain": see Compositor.full_frame_jpeg


class Compositor:
    """Full frames of one character's templates; keeps the templates' JPEG encodings for splicing."""

    def __init__(self, templates: TemplateStore, jpeg_cache_bytes: int = DEFAULT_JPEG_CACHE_BYTES,
                 paste: str = "exact"):
        self._templates = templates
        self._scans = TemplateScans(jpeg_cache_bytes)
        self._feather = Feather(feather_weights()) if check_paste(paste) == "feather" else None

    @property
    def nbytes(self) -> int:
        """The kept template encodings: they grow after load, up to the cache's cap."""
        return self._scans.nbytes

    def paste(self, template_id: int, prediction: np.ndarray, dst: np.ndarray, frame: np.ndarray | None = None) -> None:
        """Write the crop box's new pixels into ``dst`` (the box's view of a frame or region): the
        prediction pasted into its 328 crop (as the paste mode says), resized back (bicubic) straight into
        place. ``frame``, the untouched template frame where the caller has it, spares compressed templates
        a PNG decode."""
        box = self._templates.boxes[template_id]
        crop = thread_scratch("crop", (CROP_SIZE, CROP_SIZE, 3))
        template = self._templates.crop(template_id, frame)
        top, bottom = INNER.start, INNER.stop  # only the crop's ring is the template's: a frame is memory-bound
        crop[:top], crop[bottom:] = template[:top], template[bottom:]
        crop[INNER, :top], crop[INNER, bottom:] = template[INNER, :top], template[INNER, bottom:]
        crop[INNER, INNER] = prediction
        if self._feather is not None:
            self._feather.blend(prediction, template[INNER, INNER], crop[INNER, INNER])
        out = cv2.resize(crop, (box.x2 - box.x1, box.y2 - box.y1), dst=dst, interpolation=cv2.INTER_CUBIC)
        if out is not dst:  # a layout OpenCV could not write into: copy
            dst[...] = out

    def composite(self, template_id: int, prediction: np.ndarray) -> np.ndarray:
        """The full frame: a copy of the template frame with the prediction pasted into its crop box."""
        box = self._templates.boxes[template_id]
        template = self._templates.frames.get(template_id)
        frame = template.copy()
        self.paste(template_id, prediction, frame[box.y1 : box.y2, box.x1 : box.x2], template)
        return frame

    def full_frame_jpeg(self, template_id: int, prediction: np.ndarray, quality: int) -> FullFrameJpeg:
        """``encode_image(composite(template_id, prediction))`` as JPEG, byte for byte, and how it was made.

        "spliced": only the restart-aligned region around the crop box was composited (from the template's
        border strips, not its full frame) and encoded; the rest of the bytes are the template's (see
        jpeg_splice). "plain": the whole frame was, the first time a template is asked for at a quality;
        that encoding is then kept as the template's, since outside the region the frame is its template.
        """
        border = self._templates.borders[template_id]
        if border is None:  # the crop box is most of the frame
            frame = self.composite(template_id, prediction)
            height, width = frame.shape[:2]
            return FullFrameJpeg(encode_jpeg(frame, jpeg_settings(width, height, quality)), width, height, "plain")
        width, height = border.frame_size
        grid = frame_grid(width, height)
        settings = grid.settings(quality)
        key = (template_id, quality)
        template = self._scans.get(key)
        if template is None:
            with self._scans.first_encoding(key):
                template = self._scans.peek(key)  # another thread's, made while this one waited
                if template is None:
                    data = encode_jpeg(self.composite(template_id, prediction), settings)
                    self._scans.put(key, ScanSegments(data, grid.segments))
                    return FullFrameJpeg(data, width, height, "plain")
        canvas, box_pixels = border.canvas()
        self.paste(template_id, prediction, box_pixels)
        return FullFrameJpeg(splice(template, encode_jpeg(canvas, settings), grid, border.region), width, height,
                             "spliced")
