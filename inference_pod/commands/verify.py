"""``lipsync verify PACKAGE --out grid.png``: predictions beside their template crops, for a look by eye."""

from __future__ import annotations

import argparse
from pathlib import Path

from inference_pod.commands.render import add_cache_dir_flag
from inference_pod.core.precision import PRECISION_NAMES as PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="write a grid image of predictions beside their template crops")
    p.add_argument("package", type=Path, help="character package (.zip) or extracted package directory")
    p.add_argument("--audio", type=Path, help="audio file to drive the mouth; default: the package's own track")
    p.add_argument("--frames", type=int, default=6, help="rows: frames spread evenly over the track (default 6)")
    p.add_argument("--composite", action="store_true", help="add the composited full frame to each row")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="fp32 is SyncTalk_2D's exact arithmetic; fp16 and bf16 are for CUDA")
    p.add_argument("--out", type=Path, required=True, help="grid image to write (.png)")
    add_cache_dir_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference_pod.commands import require_files
    from inference_pod.tools.verify import verify

    require_files(args.package, args.audio)
    result = verify(args.package, args.out, audio_path=args.audio, frames=args.frames, composite=args.composite,
                    device=args.device, precision=args.precision, cache_dir=args.cache_dir)
    print(f"wrote {result.path} ({result.size[0]}x{result.size[1]}): {len(result.frame_ids)} rows of "
          f"{' | '.join(result.columns)}")
    for frame_id, template, diff in zip(result.frame_ids, result.template_ids, result.mean_abs_diff, strict=True):
        print(f"  frame {frame_id:5d}  template {template:4d}  mean |prediction - crop| {diff:6.2f}")
    return 0
