"""The pod's image codecs: output images as a client asked for them (JPEG, PNG or raw BGR; prediction
region or full frame), their inverse for clients, and the PNG/JPEG decoding of template frames and crops.

Encoding runs in the data plane's CPU pool, concurrently with the next device batch (OpenCV releases the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from inference_pod.core.jpeg_splice import encode_jpeg, jpeg_settings
from inference_pod.errors import InvalidInput

FORMATS = ("jpeg", "png", "raw")
REGIONS = ("full", "prediction")
DEFAULT_JPEG_QUALITY = 90
PNG_COMPRESSION = 1  # fast; PNG is for lossless output, not for small output


@dataclass(frozen=True)
class OutputSpec:
    """How one frame should come back. ``key`` is part of the frame cache key."""

    format: str = "jpeg"
    region: str = "full"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InvalidInput(f"image format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.region not in REGIONS:
            raise InvalidInput(f"output region must be one of {', '.join(REGIONS)}, got {self.region!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidInput(f"JPEG quality must be 1..100, got {self.jpeg_quality}")

    @property
    def key(self) -> str:
        quality = f"q{self.jpeg_quality}" if self.format == "jpeg" else ""
        return f"{self.region}.{self.format}{quality}"


def encode_image(bgr: np.ndarray, spec: OutputSpec) -> bytes:
    """Encode an (H, W, 3) uint8 BGR image. Raw is the pixels as they are: row-major BGR.

    Every JPEG has restart markers (see jpeg_splice): they change no pixel, and they let a full frame be
    made by encoding only its mouth region, with these very bytes.
    """
    if spec.format == "raw":
        return np.ascontiguousarray(bgr).tobytes()
    if spec.format == "jpeg":
        return encode_jpeg(bgr, jpeg_settings(bgr.shape[1], bgr.shape[0], spec.jpeg_quality))
    return encode_png(bgr, PNG_COMPRESSION)


def encode_png(bgr: np.ndarray, compression: int) -> bytes:
    """Lossless PNG at zlib ``compression`` 0..9 (decoding costs about the same at every level)."""
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {bgr.shape} image as png")
    return buf.tobytes()


def decode_bgr(data: bytes | memoryview) -> np.ndarray | None:
    """A JPEG or PNG as (H, W, 3) uint8 BGR, like cv2.imread; None when it does not decode."""
    image: np.ndarray | None = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return image


def decode_image(data: bytes, fmt: str, width: int = 0, height: int = 0) -> np.ndarray:
    """The inverse, for clients and tests: bytes back to (H, W, 3) uint8 BGR."""
    if fmt == "raw":
        if width <= 0 or height <= 0 or len(data) != width * height * 3:
            raise InvalidInput(f"raw image of {len(data)} bytes does not match {width}x{height}x3")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    image = decode_bgr(data)
    if image is None:
        raise InvalidInput(f"cannot decode {fmt} image of {len(data)} bytes")
    return image


def frame_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """Threads that each composite and encode whole frames, in parallel. OpenCV is told to stay on the
    calling thread (process-wide): its own threads inside one frame's resize spend about 60 % more CPU on
    the same pixels (measured at 1080p), and the frames are already spread over these threads."""
    cv2.setNumThreads(1)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
