"""The ``lipsync`` command line. Each subcommand lives in inference_pod/commands/<name>.py.

``main`` is the one place that turns a user's mistake into one line, ``lipsync: error: <what> — <fix>``,
and a non-zero exit: the project's own errors (``LipSyncError``) and operating-system errors on a path the
user gave. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator
from pathlib import Path

from inference_pod import __version__, commands
from inference_pod.errors import LipSyncError

USER_ERROR = 2  # the project's errors and bad paths, like argparse's usage errors

_OS_FIXES = {
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EACCES: ("permission denied", "check the file's permissions, or choose another path"),
    errno.EPERM: ("operation not permitted", "check the file's permissions, or choose another path"),
    errno.EISDIR: ("is a directory", "give a file"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.ENOSPC: ("no space left on the device", "free some space or choose another place"),
    errno.EROFS: ("read-only file system", "choose a writable place"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description="SyncTalk_2D lip-sync serving",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lipsync {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    # Subcommands create their parsers with argparse's plain formatter; give them ours (defaults shown).
    for _, p in walk_parsers(parser):
        if p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = HelpFormatter
    return parser


def walk_parsers(parser: argparse.ArgumentParser, prog: str = "lipsync") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` (itself first), with its command line, e.g. ``lipsync client frame``."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk_parsers(child, f"{prog} {name}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except LipSyncError as exc:
        return fail(str(exc))
    except OSError as exc:
        line = _path_error(parser, args, exc)
        if line is None:
            raise  # not about a path the user gave: a bug, keep the traceback
        return fail(line)


def fail(message: str) -> int:
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())  # e.g. ffmpeg's stderr
    print(f"lipsync: error: {line}", file=sys.stderr)
    return USER_ERROR


def _path_error(parser: argparse.ArgumentParser, args: argparse.Namespace, exc: OSError) -> str | None:
    """One line for an OSError on a path the user gave (or a path inside one), else None."""
    if exc.filename is None:
        return None
    failed = Path(os.fsdecode(exc.filename))
    for label, given in _given_paths(parser, args):
        if failed == given or given in failed.parents:
            what, fix = _OS_FIXES.get(exc.errno or 0, (exc.strerror or str(exc), "check the path"))
            where = f" ({failed})" if failed != given else ""
            return f"{label} {given}: {what}{where} — {fix}"
    return None


def _given_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    """(how the user named it, path) for every path argument of the chosen command."""
    current: argparse.ArgumentParser | None = parser
    while current is not None:
        child = None
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                child = action.choices.get(getattr(args, action.dest, None) or "")
                continue
            value = getattr(args, action.dest, None)
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(path, Path):
                    yield (action.option_strings[-1] if action.option_strings else action.dest.upper()), path
        current = child


if __name__ == "__main__":
    sys.exit(main())
