"""Command line: ``klayer <command> ...``. A thin shell over the library modules.

Each command lives in its own module under ``klayer/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` (a function of the
parsed arguments returning an exit status).

Errors the user can cause (a bad flag, a missing or malformed file, a value out of range:
:class:`klayer.nn.errors.UserError`, an ``OSError`` about the user's files, argparse's
usage errors) print one line, ``klayer <command>: error: ...``, and exit with status 2.
Anything else is a bug in klayer: one line says so and where its traceback was written
(``last-error.log`` in klayer's cache folder), and the exit status is 1; ``klayer --debug
<command>`` (or ``KLAYER_DEBUG=1``) lets the exception through with its traceback. When the
reader of the output goes away (``klayer ... | head -1``), the command stops quietly with
status 141, as if killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

from klayer.nn.errors import UserError

# Command modules, in the order ``klayer --help`` lists them.
COMMANDS = ["data", "gradcheck", "diagnose", "train", "evaluate", "predict", "export",
            "search", "reproduce"]

INTERNAL_ERROR = 1
USAGE_ERROR = 2
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`
ERROR_LOG = "last-error.log"  # in error_log_dir(): the traceback of klayer's last bug


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
    parser.add_argument("--debug", action="store_true",
                        help="let an internal error through with its traceback (also "
                             "KLAYER_DEBUG=1)")
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
    debug = args.debug or os.environ.get("KLAYER_DEBUG", "").lower() in ("1", "true")
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
    except (UserError, OSError) as exc:  # the user's input or files: no traceback
        return _error(args.command, str(exc))
    except Exception as exc:  # a bug in klayer, never shown as the user's error
        if debug:
            raise
        return _internal_error(args.command, exc)


def _error(command: str, message: str) -> int:
    print(f"klayer {command}: error: {_one_line(message)}", file=sys.stderr)
    return USAGE_ERROR


def error_log_dir() -> Path:
    """Where the traceback of an internal error is written: $XDG_CACHE_HOME/klayer, else
    ~/.cache/klayer."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "klayer"


def _internal_error(command: str, exc: BaseException) -> int:
    """One line saying that klayer failed (not the user), with where its traceback is."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        log = error_log_dir() / ERROR_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"klayer {command} ({' '.join(sys.argv[1:])})\n{text}", encoding="utf-8")
        where = f"traceback in {log}; "
    except OSError:
        where = ""
    message = _one_line(f"{type(exc).__name__}: {exc}")
    print(f"klayer {command}: internal error (a bug in klayer, not in your input): {message} "
          f"({where}rerun with klayer --debug {command} ... to see it)", file=sys.stderr)
    return INTERNAL_ERROR


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
    # `python -m klayer.cli` runs this file as __main__: run the klayer.cli module's main,
    # the one the command modules and tests know.
    from klayer.cli import main as klayer_main

    sys.exit(klayer_main())
