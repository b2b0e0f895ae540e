"""The ``lipsync`` command line. Each subcommand lives in inference_pod/commands/<name>.py.

``main`` is the one place that turns a user's mistake into one line, ``lipsync: error: <what> — <fix>``,
and a non-zero exit: the project's own errors (``LipSyncError``) and operating-system errors on a path the
user gave. Anything else is a bug and keeps its traceback. A usage mistake is answered by the parser of the
command the user was typing (``lipsync client frame``'s usage, not ``lipsync``'s), and output cut short by
its reader (``lipsync package inspect --json | head -1``) ends quietly, as for any Unix tool.
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
BROKEN_PIPE = 141  # what a shell reports for a writer killed by SIGPIPE (128 + 13)

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
    args = parse_args(parser, argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so a reader that went away is handled below
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (`| head -1`): stop quietly. Point stdout at /dev/null so the
        # interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except LipSyncError as exc:
        return fail(str(exc))
    except OSError as exc:
        line = _path_error(parser, args, exc)
        if line is None:
            raise  # not about a path the user gave: a bug, keep the traceback
        return fail(line)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that unknown arguments are reported by the innermost command's parser,
    with its usage, and an option that belongs to an enclosing command says where it goes."""
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    chain = _chosen_parsers(parser, args)  # [(prog, parser)], outermost first
    prog, innermost = chain[-1]
    message = f"unrecognized arguments: {' '.join(unknown)}"
    for outer_prog, outer in reversed(chain[:-1]):
        options = [o for a in outer._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings]
        misplaced = [u for u in unknown if u.split("=", 1)[0] in options]
        if misplaced:
            action = prog[len(outer_prog):].split()[0]
            message += (f" — {', '.join(misplaced)} belongs to '{outer_prog}': put it before '{action}', "
                        f"e.g. {outer_prog} {misplaced[0].split('=', 1)[0]} ... {action} ...")
            break
        if options and outer is not parser:
            action = prog[len(outer_prog):].split()[0]
            message += f" (options of '{outer_prog}', such as {', '.join(options[:3])}, go before '{action}')"
            break
    innermost.error(message)
    raise AssertionError("unreachable: ArgumentParser.error exits")


def _chosen_parsers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parsers of the command line the user typed, outermost first: lipsync, lipsync client, ..."""
    chain: list[tuple[str, argparse.ArgumentParser]] = [(parser.prog, parser)]
    current: argparse.ArgumentParser | None = parser
    while current is not None:
        child = None
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                child = action.choices.get(getattr(args, action.dest, None) or "")
        if child is not None:
            chain.append((child.prog, child))
        current = child
    return chain


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
    for _, chosen in _chosen_parsers(parser, args):
        for action in chosen._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            value = getattr(args, action.dest, None)
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(path, Path):
                    yield (action.option_strings[-1] if action.option_strings else action.dest.upper()), path

if __name__ == "__main__":
    sys.exit(main())
