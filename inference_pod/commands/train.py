"""``lipsync train``: fine-tune a package's U-Net on its own template frames and default track (see inference_pod/tools/train.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a package's U-Net on its frames and default track; write a new package version",
        description="SyncTalk_2D's reconstruction objective (masked frame + reference frame in, L1 against the real "
        "frame). Template frame i is paired with the default track's audio at frame i. Deterministic on CPU.",
    )
    p.add_argument("package", type=Path, metavar="PACKAGE", help="package zip or extracted directory to train from")
    p.add_argument("--out", type=Path, required=True, metavar="NEW.zip", help="the trained package to write")
    p.add_argument("--version", help="version of the new package (default: the old one + 1, or '<old>-trained')")
    p.add_argument("--steps", type=int, default=400, help="total optimisation steps (default 400)")
    p.add_argument("--batch-size", type=int, default=4, help="frames per step (default 4)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling frames (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed for reproducibility (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help="where checkpoints go (default: NEW.checkpoints/)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a checkpoint (same settings)")
    p.add_argument("--export-unet", type=Path, metavar="FILE.pth", help="also save the trained U-Net state_dict here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from inference_pod.tools.train import TrainConfig, train

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        threads=args.threads, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = train(
        args.package, args.out, config, device=device, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        version=args.version, export_unet=args.export_unet, progress=not args.no_progress,
    )  # fmt: skip
    losses = "" if result.first_loss is None else f", L1 {result.first_loss:.4f} -> {result.last_loss:.4f}"
    print(f"trained {result.steps} steps on {device}{losses}; wrote {result.package}")
    if args.export_unet:
        print(f"U-Net weights: {args.export_unet}")
    return 0
