"""Template frames: dimensions from a JPEG or PNG header without decoding, and the full decode check."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from inference_pod.core.encoding import decode_bgr
from inference_pod.errors import PackageError
from inference_pod.package.manifest import MAX_IMAGE_SIDE


def image_dimensions(fh: BinaryIO, ext: str) -> tuple[int, int]:
    """(width, height) from a JPEG or PNG header, without decoding the image."""
    if ext == "png":
        head = fh.read(24)
        if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
            raise PackageError("not a PNG image")
        width, height = struct.unpack(">II", head[16:24])
    else:
        width, height = _jpeg_dimensions(fh)
    if width == 0 or height == 0:
        raise PackageError(f"image header declares an empty {width}x{height} image")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise PackageError(f"image header declares {width}x{height}; frames may be at most {MAX_IMAGE_SIDE} a side")
    return int(width), int(height)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(fh: BinaryIO) -> tuple[int, int]:
    if fh.read(2) != b"\xff\xd8":
        raise PackageError("not a JPEG image")
    while True:
        byte = fh.read(1)
        if byte != b"\xff":
            raise PackageError("JPEG image has no frame header")
        marker = 0xFF
        while marker == 0xFF:  # fill bytes
            nxt = fh.read(1)
            if not nxt:
                raise PackageError("JPEG image has no frame header")
            marker = nxt[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        if marker in (0xD9, 0xDA):
            raise PackageError("JPEG image has no frame header")
        raw = fh.read(2)
        if len(raw) < 2 or struct.unpack(">H", raw)[0] < 2:
            raise PackageError("JPEG image is truncated")
        length = struct.unpack(">H", raw)[0]
        if marker in _JPEG_SOF:
            sof = fh.read(5)
            if len(sof) < 5:
                raise PackageError("JPEG image is truncated")
            height, width = struct.unpack(">HH", sof[1:5])
            return width, height
        fh.seek(length - 2, os.SEEK_CUR)


# What a complete file ends with: JPEG's end-of-image marker, PNG's IEND chunk (with its CRC).
_END_MARKERS = {b"\xff\xd8": b"\xff\xd9", b"\x89PNG": b"IEND\xaeB`\x82"}


def check_decodes(data: bytes, member: str, image_size: tuple[int, int]) -> None:
    for magic, end in _END_MARKERS.items():
        # decoders fill a truncated image with grey rather than fail, so look for the end marker
        if data.startswith(magic) and not data.rstrip(b"\x00").endswith(end):
            raise PackageError(f"{member} is truncated (no end-of-image marker)")
    image = decode_bgr(data)
    if image is None:
        raise PackageError(f"{member} does not decode as an image")
    if (image.shape[1], image.shape[0]) != tuple(image_size):
        raise PackageError(
            f"{member} decodes to {image.shape[1]}x{image.shape[0]}, the manifest says {image_size[0]}x{image_size[1]}"
        )
