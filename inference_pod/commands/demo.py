"""``lipsync demo``: the embedded default — a demo character rendered to PNG frames and an mp4, on CPU.

Needs no GPU, no Redis and no cluster (espeak-ng gives the voice, ffmpeg the mp4): the character is
generated (drawn frames, the committed trained weights, an espeak-ng voice), packaged with the real
converter, then rendered speaking its own line or any audio file passed with --audio.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a demo character and render it to frames and an mp4 (CPU)")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output directory (default demo-output)")
    p.add_argument("--name", default="demo", help="character name")
    p.add_argument("--audio", type=Path, metavar="FILE", help="speech to render (wav, mp3, ...; default: the demo's own line)")
    p.add_argument("--random-weights", action="store_true", help="untrained, seeded random weights (the mouth will not move)")
    p.add_argument("--width", type=int, help="U-Net base width with --random-weights (default 8)")
    p.add_argument("--frames", type=int, default=50, help="template frames to draw")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-video", action="store_true", help="PNG frames only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference_pod.core.engine import Engine
    from inference_pod.errors import InvalidInput
    from inference_pod.tools.demo_character import TRAINED
    from inference_pod.tools.render import render, track_for

    if args.audio is not None and not args.audio.is_file():
        raise InvalidInput(f"--audio {args.audio}: no such file")
    if args.width is not None and not args.random_weights:
        raise InvalidInput(f"--width applies to --random-weights only: the trained demo is width {TRAINED.width}")
    package = build(args.out, args.name, args.frames, args.random_weights, args.width)
    engine = Engine.from_package(package, device=args.device)
    video = None if args.no_video or shutil.which("ffmpeg") is None else args.out / f"{args.name}.mp4"
    audio_path = args.audio or package.default_audio_path()
    result = render(engine, args.out / "frames", track_for(engine, args.audio, None), video=video, audio_path=audio_path)
    print(f"rendered {result.frames} frames to {result.out_dir}" + (f", video {result.video}" if result.video else ""))
    return 0


def build(out: Path, name: str = "demo", frames: int = 50, random_weights: bool = False, width: int | None = None):
    """The demo's package, ``OUT/NAME.zip``, extracted where ``lipsync serve --models-dir OUT`` keeps its
    copies (``OUT/.store``), so that serving the demo's output reuses this copy instead of making a second."""
    from inference_pod.package import extract_package
    from inference_pod.serving.model_store import store_copy
    from inference_pod.serving.settings import Settings
    from inference_pod.tools.demo_character import TRAINED, build_demo_package, default_speech

    out.mkdir(parents=True, exist_ok=True)
    package_path = out / f"{name}.zip"
    manifest = build_demo_package(name, package_path, width=(width or 8) if random_weights else TRAINED.width,
                                  frames=frames, speech=default_speech(), trained=not random_weights)
    print(f"demo character package: {package_path}")
    return extract_package(package_path, store_copy(Settings(models_dir=out).extract_dir, manifest))
