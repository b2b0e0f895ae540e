"""``lipsync render PACKAGE --audio WAV --out DIR``: offline rendering to PNG frames (+ mp4)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from inference_pod.commands import positive_int
from inference_pod.core.precision import PRECISION_NAMES as PRECISIONS
from inference_pod.core.templates import PASTE_MODES

CACHE_DIR_ENV = "LIPSYNC_CACHE_DIR"


def add_cache_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=os.environ.get(CACHE_DIR_ENV) or None,
                   help=f"where package zips are extracted, once per version (env {CACHE_DIR_ENV}; default: "
                        "$XDG_CACHE_HOME/lipsync/packages, i.e. ~/.cache/lipsync/packages)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render an audio track through a character to PNG frames (and an mp4)")
    p.add_argument("package", type=Path, help="character package (.zip) or extracted package directory")
    p.add_argument("--audio", type=Path, help="audio file (WAV, FLAC, MP3...); default: the package's own track")
    p.add_argument("--features", type=Path, help="precomputed (T, D) features .npy instead of --audio (hubert/wenet)")
    p.add_argument("--out", type=Path, required=True, help="directory for frame_NNNNNN.png")
    p.add_argument("--video", type=Path, help="also write an mp4 with the audio muxed in (needs ffmpeg)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="fp32 is SyncTalk_2D's exact arithmetic; fp16 and bf16 are for CUDA")
    p.add_argument("--paste", choices=PASTE_MODES, default="exact",
                   help="exact is SyncTalk_2D's paste; feather fades the prediction in from the mouth mask's edge, "
                        "for a network whose edge shows the crop box as a line (default exact)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="frames per network call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cache_dir_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference_pod.commands import require_files
    from inference_pod.core.engine import Engine
    from inference_pod.package import open_package
    from inference_pod.tools.render import render, track_for

    require_files(args.package, args.audio, args.features)  # before the model load, not after
    package = open_package(args.package, cache_dir=args.cache_dir)
    engine = Engine.from_package(package, device=args.device, precision=args.precision, max_batch=args.batch_size,
                                 paste=args.paste)
    features = track_for(engine, args.audio, args.features)
    audio_path = args.audio if args.audio is not None else package.default_audio_path()
    result = render(engine, args.out, features, video=args.video, audio_path=audio_path,
                    batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {result.frames} frames to {result.out_dir}" + (f" and {result.video}" if result.video else ""))
    return 0
