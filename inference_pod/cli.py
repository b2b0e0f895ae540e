"""The ``lipsync`` command line. Each subcommand lives in inference_pod/commands/<name>.py."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from inference_pod import __version__, commands
from inference_pod.errors import LipSyncError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description="SyncTalk_2D lip-sync serving")
    parser.add_argument("--version", action="version", version=f"lipsync {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except LipSyncError as exc:
        print(f"lipsync: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
