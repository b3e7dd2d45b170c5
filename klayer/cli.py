"""Command line: ``klayer <command> ...``. A thin shell over the library modules."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klayer",
        description="k-layer networks with batch normalization on CIFAR-10, in NumPy.",
    )
    from klayer import __version__

    parser.add_argument("--version", action="version", version=f"klayer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_command(commands)
    return parser


# --- klayer data ----------------------------------------------------------------------


def _add_data_command(commands) -> None:
    p = commands.add_parser("data", help="locate, verify and describe CIFAR-10")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py (or -bin)")
    p.set_defaults(handler=_cmd_data)


def _cmd_data(args) -> int:
    raise NotImplementedError("klayer data: being written")


# --- entry point ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:  # user-facing errors
        print(f"klayer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
