"""``lipsync demo``: the embedded default — a demo character rendered to PNG frames and an mp4, on CPU.

Needs no trained weights, no GPU, no Redis and no cluster: the character is generated (drawn frames,
seeded weights, a synthetic voice track), packaged with the real converter, then rendered.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a demo character and render it to frames and an mp4 (CPU)")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory (default demo-output)")
    p.add_argument("--name", default="demo", help="character name")
    p.add_argument("--width", type=int, default=8, help="U-Net base width (32 = SyncTalk_2D's full model)")
    p.add_argument("--frames", type=int, default=50, help="template frames to draw")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-video", action="store_true", help="PNG frames only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference_pod.demo_character import build_demo_package
    from inference_pod.engine import Engine
    from inference_pod.package import open_package
    from inference_pod.render import render, track_for

    args.out.mkdir(parents=True, exist_ok=True)
    package_path = args.out / f"{args.name}.zip"
    build_demo_package(args.name, package_path, width=args.width, frames=args.frames)
    print(f"demo character package: {package_path}")
    package = open_package(package_path, cache_dir=args.out / "store")
    engine = Engine.from_package(package, device=args.device)
    video = None if args.no_video or shutil.which("ffmpeg") is None else args.out / f"{args.name}.mp4"
    result = render(engine, args.out / "frames", track_for(engine, None, None), video=video,
                    audio_path=package.default_audio_path())
    print(f"rendered {result.frames} frames to {result.out_dir}" + (f", video {result.video}" if result.video else ""))
    return 0
