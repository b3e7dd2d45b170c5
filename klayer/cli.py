"""Command line: ``klayer <command> ...``. A thin shell over the library modules.

Each command lives in its own module under ``klayer/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` (a function of the
parsed arguments returning an exit status).

Errors the user can cause (a bad flag, a missing or malformed file, a value out of range)
print one line, ``klayer <command>: error: ...``, and exit with status 2; anything else is
a bug and keeps its traceback. When the reader of the output goes away (``klayer ... |
head -1``), the command stops quietly with status 141, as if killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command modules, in the order ``klayer --help`` lists them.
COMMANDS = ["data", "gradcheck", "diagnose", "train", "evaluate", "predict", "export",
            "search", "reproduce"]

USAGE_ERROR = 2
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file): printed without a traceback."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``<prog>: error: ...``, without
    the usage block (``--help`` still shows it). Sub-command parsers inherit the class."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    from klayer.version import __version__

    parser = Parser(
        prog="klayer",
        description="k-layer networks with batch normalization on CIFAR-10, in NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"klayer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"klayer.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"klayer.commands.{name}":
                continue  # command not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (also after --help or a usage error)."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE


def _run(argv) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), printed already
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    if unknown:
        return _error(args.command, f"unrecognized arguments: {' '.join(unknown)}; "
                                    f"see klayer {args.command} --help")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"klayer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except MemoryError:
        return _error(args.command, "not enough memory (for training: reduce --hidden, "
                                    "--batch-size or --subset)")
    except (UserError, ValueError, OSError) as exc:  # user-facing errors, no traceback
        return _error(args.command, str(exc))


def _error(command: str, message: str) -> int:
    print(f"klayer {command}: error: {_one_line(message)}", file=sys.stderr)
    return USAGE_ERROR


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush finds no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass


if __name__ == "__main__":
    # `python -m klayer.cli` runs this file as __main__; the commands raise
    # klayer.cli.UserError, so run the klayer.cli module's main, whose handlers know it.
    from klayer.cli import main as klayer_main

    sys.exit(klayer_main())
