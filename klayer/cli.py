"""Command line: ``klayer <command> ...``. A thin shell over the library modules.

Each command lives in its own module under ``klayer/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` (a function of the
parsed arguments returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order ``klayer --help`` lists them.
COMMANDS = ["data", "gradcheck", "train", "evaluate", "predict", "export", "search",
            "reproduce"]


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file): printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from klayer.version import __version__

    parser = argparse.ArgumentParser(
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"klayer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError) as exc:  # user-facing errors, no traceback
        print(f"klayer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
