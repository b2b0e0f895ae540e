"""The HTTP gateway's JSON: request objects in (checked field by field), plain dicts out.

Shared by the REST routes and the WebSocket protocol, so both read a frame request the same way and report
a bad field the same way (``InvalidInput`` / ``AudioError``, i.e. HTTP 400). Responses are built from the
pipeline's ``FrameResult`` and from the data plane's views (serving/views.py), the very values GetStats and
ListModels render, so /stats and /models report exactly what they do.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from inference_pod.core.encoding import DEFAULT_JPEG_QUALITY, OutputSpec
from inference_pod.errors import InvalidInput, clip
from inference_pod.serving.pipeline import AudioInput, FrameRequest, FrameResult

OUTPUT_FIELDS = frozenset({"format", "region", "jpeg_quality"})
FRAME_FIELDS = frozenset({"model_name", "frame_id", "audio_override"}) | OUTPUT_FIELDS
_REQUIRED = object()
# The largest frame id: gRPC's frame_id is an int64, and both doors accept the same ids.
MAX_FRAME_ID = 2**63 - 1
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def parse_json(data: bytes | str, what: str = "request body") -> dict[str, Any]:
    """A JSON object, or InvalidInput saying what is wrong with it."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recurses per level: arrays in arrays 100,000 deep end here
        raise InvalidInput(f"{what} is nested too deeply: no request nests more than a few levels") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def field(obj: dict, name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """``obj[name]`` checked against ``kind`` (JSON null counts as absent). Booleans are not numbers here:
    ``"frame_id": true`` is a client bug, not frame 1. An integer may be written with a zero fraction
    (``12.0``), as JSON Schema counts it an integer and some encoders write every number so; ``12.5`` is not."""
    value = obj.get(name)
    if value is None:
        if default is _REQUIRED:
            raise InvalidInput(f"{name!r} is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, float) and int in kinds and float not in kinds and value.is_integer():
        value = int(value)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        expected = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                                list: "an array", dict: "an object"}[k] for k in kinds)
        raise InvalidInput(f"{name!r} must be {expected}, got {_json_type(value)}")
    return value


def reject_unknown(obj: dict, allowed: frozenset[str], what: str) -> None:
    """Unknown fields are errors: a misspelt optional field ("audio" for "audio_override") would otherwise be
    ignored silently and the request served with the wrong input."""
    unknown = sorted(set(obj) - allowed)
    if unknown:
        names = ", ".join(clip(name) for name in unknown[:5]) + (", …" if len(unknown) > 5 else "")
        raise InvalidInput(f"unknown field(s) in {what}: {names}; allowed: {', '.join(sorted(allowed))}")


def decode_base64(text: str, name: str) -> bytes:
    """Standard base64, with or without line breaks, or a ``data:...;base64,`` URL (what a browser's
    FileReader.readAsDataURL produces)."""
    text = _DATA_URL.sub("", text, count=1)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{name!r} is not valid base64: {exc}") from None


def output_spec(obj: dict) -> OutputSpec:
    return OutputSpec(format=field(obj, "format", str, "jpeg"), region=field(obj, "region", str, "full"),
                      jpeg_quality=field(obj, "jpeg_quality", int, DEFAULT_JPEG_QUALITY))


def audio_override(obj: dict) -> AudioInput | None:
    """The optional audio file (WAV, FLAC, OGG, MP3 ...) as base64; None: the model's default track."""
    text = field(obj, "audio_override", str, None)
    if text is None:
        return None
    if not text:
        raise InvalidInput("'audio_override' is empty: send an audio file as base64, or leave it out (or null) "
                           "for the model's default track")
    return AudioInput(decode_base64(text, "audio_override"), "file")


def frame_id(obj: dict, name: str = "frame_id", default: Any = _REQUIRED) -> Any:
    value = field(obj, name, int, default)
    if value is not None and value < 0:
        raise InvalidInput(f"{name!r} must be 0 or more (a frame id), got {value}")
    return at_most_max_frame_id(name, value)


def at_most_max_frame_id(name: str, value: Any) -> Any:
    if value is not None and value > MAX_FRAME_ID:
        raise InvalidInput(f"{name!r} must be at most {MAX_FRAME_ID} (a frame id), got a larger number")
    return value


def frame_request(obj: dict, extra: frozenset[str] = frozenset(), what: str = "a frame request") -> FrameRequest:
    """POST /generate/frame's body, one /generate/batch item, or a WebSocket "frame" message: everything
    its schema says is checked here, so a request the schema refuses is refused (400) before any work."""
    reject_unknown(obj, FRAME_FIELDS | extra, what)
    return FrameRequest(model=field(obj, "model_name", str), frame_id=at_most_max_frame_id("frame_id", field(obj, "frame_id", int)),
                        audio=audio_override(obj), output=output_spec(obj))


# ------------------------------------------------------------------------------------------ responses


def frame_json(result: FrameResult) -> dict[str, Any]:
    """One generated frame, in the replaced service's shape plus what the gRPC Frame carries."""
    t = result.timings
    return {
        "success": True,
        "model_name": result.model,
        "model_version": result.version,
        "frame_id": result.frame_id,
        "template_id": result.template_id,
        "frame": base64.b64encode(result.image).decode("ascii"),
        "format": result.output.format,
        "region": result.output.region,
        "width": result.width,
        "height": result.height,
        "crop_box": list(result.crop_box),
        "from_cache": result.cached,
        "processing_time_ms": t.total_s * 1e3,
        "auto_loaded": result.auto_loaded,
        "timings": {"total_ms": t.total_s * 1e3, "features_ms": t.features_s * 1e3, "queue_ms": t.queue_s * 1e3,
                    "inference_ms": t.inference_s * 1e3, "encode_ms": t.encode_s * 1e3,
                    "batch_size": t.batch_size},
    }


def error_json(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """Every error, whole-request or per item: the gRPC status name and the message gRPC would send."""
    return {"success": False, "error": message, "code": code, **extra}
