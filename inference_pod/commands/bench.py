"""``lipsync bench engine`` and ``lipsync bench service``."""

from __future__ import annotations

import argparse
from pathlib import Path

from inference_pod.engine import PRECISIONS


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench.add_parser("engine", help="batched engine vs SyncTalk_2D's per-frame loop, in one run")
    p.add_argument("--package", type=Path, help="character package; default: a generated demo of --width")
    p.add_argument("--width", type=int, default=32, help="U-Net base width of the generated demo (32 = SyncTalk_2D)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--batch-sizes", type=_int_list, default="1,2,4,8,16,32,64")
    p.add_argument("--frames", type=int, default=64, help="frames per batch-size run")
    p.add_argument("--naive-frames", type=int, default=16, help="frames through the naive loop")
    p.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))
    p.set_defaults(func=run_engine)


def run_engine(args: argparse.Namespace) -> int:
    from inference_pod.bench.engine_bench import EngineBenchConfig, run

    cfg = EngineBenchConfig(package=args.package, width=args.width, device=args.device, precision=args.precision,
                            batch_sizes=args.batch_sizes, frames=args.frames, naive_frames=args.naive_frames,
                            out=args.out)
    result = run(cfg)
    print(result["markdown"])
    print(f"\nJSON: {args.out}")
    return 0
