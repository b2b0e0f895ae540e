"""What one WebRTC viewer costs the pod's CPU: the video encoder of POST /webrtc/offer, alone.

    python -m inference_pod.bench.webrtc_encoding [--frames 100]

For each size and codec, a session's worth of frames (a textured still with a mouth-sized patch that changes
every frame, as an avatar's does) goes through ``api.http.webrtc.VideoEncoder`` exactly as a session's do
(BGR in, yuv420p conversion and scaling, encode); the thread's CPU time per frame is measured, and the share
of one core a 25 fps session needs. Also: what taking frames as JPEG instead of raw pixels would add (a JPEG
decode per frame; the pod's JPEG encode comes on top).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from inference_pod.api.http.webrtc import DEFAULT_BITRATE_KBPS, VideoEncoder, VideoOptions

SIZES = ((1280, 720), (1920, 1080))
CODECS = ("h264", "vp8")
FPS = 25


def frames(width: int, height: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    still = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    mouth_w, mouth_h = width // 10, height // 14
    x, y = width // 2 - mouth_w // 2, height * 2 // 3
    out = []
    for i in range(count):
        frame = still.copy()
        opening = int(mouth_h * (0.5 + 0.5 * np.sin(i / 2.0)))
        cv2.ellipse(frame, (x + mouth_w // 2, y + mouth_h // 2), (mouth_w // 2, max(1, opening // 2)), 0, 0, 360,
                    (40, 30, 120), -1)
        out.append(frame)
    return out


def measure(codec: str, width: int, height: int, count: int) -> tuple[float, float]:
    """(CPU ms per frame, Mbit/s at 25 fps) for one session's encoder."""
    encoder = VideoEncoder(codec, VideoOptions(codec, None, None, DEFAULT_BITRATE_KBPS), fps=FPS)
    images = frames(width, height, count)
    encoder.encode(images[0], 0)  # opening the codec is not per frame
    sent = 0
    started = time.thread_time()
    for tick, image in enumerate(images[1:], start=1):
        packet = encoder.encode(image, tick)
        sent += packet.size if packet is not None else 0
    cpu = (time.thread_time() - started) / (count - 1)
    return cpu * 1e3, sent * 8 * FPS / (count - 1) / 1e6


def jpeg_decode_ms(width: int, height: int, count: int = 20) -> float:
    image = frames(width, height, 1)[0]
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    started = time.thread_time()
    for _ in range(count):
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return (time.thread_time() - started) / count * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100, help="frames per measurement (4 s at 25 fps)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    print(f"| size | codec | CPU ms/frame | one core at {FPS} fps | Mbit/s | JPEG decode ms/frame (avoided) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for width, height in SIZES:
        decode = jpeg_decode_ms(width, height)
        for codec in CODECS:
            ms, mbits = measure(codec, width, height, args.frames)
            print(f"| {width}x{height} | {codec} | {ms:.1f} | {ms * FPS / 10:.0f} % | {mbits:.2f} | {decode:.1f} |")


if __name__ == "__main__":
    main()
