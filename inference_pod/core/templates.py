"""Template bookkeeping that needs no numerics: the walk through a character's template frames and where
their crops may live. Light on purpose: settings and command lines read it without importing torch."""

from __future__ import annotations

from inference_pod.errors import InvalidInput

# Where an engine keeps its 328x328 template crops (see inference_pod.core.engine).
TEMPLATE_STORAGES = ("device", "host", "compressed")
# How a prediction goes back into its template's crop (see inference_pod.core.engine.compositing): SyncTalk_2D's
# exact paste, or faded in from the mouth mask's edge so the crop box leaves no line in the frame.
PASTE_MODES = ("exact", "feather")

# The side of a template's crop: SyncTalk_2D's 320x320 network input and a 4-pixel ring around it.
TEMPLATE_CROP_SIZE = 328


def pingpong_index(frame_id: int, n_templates: int) -> int:
    """Template frame for output frame ``frame_id``: SyncTalk_2D walks 1, 2, ..., N-1, N-2, ..., 0, 1, ...

    Its loop steps before it reads, starting from 0, so output 0 uses template 1 and the walk turns at
    both ends; the period is 2(N-1).
    """
    if frame_id < 0:
        raise InvalidInput(f"frame id must be >= 0, got {frame_id}")
    if n_templates < 2:
        return 0
    period = 2 * (n_templates - 1)
    pos = (frame_id + 1) % period
    return pos if pos < n_templates else period - pos
