"""The README's command lines use only flags that exist.

Every ``klayer <command> ...`` line of README.md — in its fenced bash blocks and in its
inline code — names a registered command, and every ``--flag`` on it is one that
``klayer <command> --help`` lists. The bash blocks' lines without placeholders (DIR, N,
a|b) are also parsed by the real parser, which must accept them whole: no unknown
argument, no bad value, no missing argument. The training options table (docs/training.md)
names config keys that exist and flags that both `klayer train` and `klayer search` take.
This catches a README that documents a flag or a choice that no longer exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest

from klayer.cli import COMMANDS, build_parser, main
from klayer.config import TrainConfig

README = Path(__file__).resolve().parent.parent / "README.md"
TRAINING = README.parent / "docs" / "training.md"
# commands the README documents that are being added on another branch: until they land,
# their lines are expected failures (reported as xfail), checked in full once they exist
PENDING = {"diagnose"}
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # may wrap onto a second line
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(where, tokens after "klayer") of every klayer command line in the README."""
    lines = []
    for block in FENCED.finditer(text):
        if block.group(1) in ("bash", "sh", "shell", "console", ""):
            lines += [("bash block", line) for line in block.group(2).splitlines()]
    prose = FENCED.sub("", text)
    lines += [("inline code", " ".join(span.replace("\\|", "|").split()))
              for span in INLINE.findall(prose)]
    found = []
    for where, line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
        for part in line.split("&&"):
            tokens = [t.strip("[]") for t in part.split()]
            tokens = [t for t in tokens if t]
            if len(tokens) >= 2 and tokens[0] == "klayer" and re.fullmatch(r"[a-z]+", tokens[1]):
                found.append((where, tokens[1:]))
    unique = {}  # each line once, from a bash block if it is in one (those come first)
    for where, tokens in found:
        unique.setdefault(tuple(tokens), (where, tokens))
    return list(unique.values())


COMMAND_LINES = readme_commands(README.read_text(encoding="utf-8"))


def help_text(command: str) -> str:
    """What ``klayer <command> --help`` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([command, "--help"]) == 0  # klayer.cli.main returns argparse's exit
    return out.getvalue()


def help_flags(command: str) -> set[str]:
    """The flags ``klayer <command> --help`` lists."""
    return set(FLAG.findall(help_text(command)))


def has_placeholder(tokens: list[str]) -> bool:
    """DIR, N, RUN, PX, a|b, ε, …: a line to read, not to run."""
    return any(re.fullmatch(r"[A-Z][A-Z_]*", t) or "|" in t or not t.isascii()
               for t in tokens)


def test_the_readme_has_command_lines():
    commands = {tokens[0] for _, tokens in COMMAND_LINES}
    assert {"train", "search", "reproduce", "gradcheck", "evaluate"} <= commands
    assert len(COMMAND_LINES) >= 15


@pytest.mark.parametrize("where, tokens", COMMAND_LINES,
                         ids=[" ".join(tokens) for _, tokens in COMMAND_LINES])
def test_readme_command_uses_existing_flags(where, tokens):
    command = tokens[0]
    if command in PENDING and command not in COMMANDS:
        pytest.xfail(f"klayer {command} is not registered yet")
    assert command in COMMANDS, f"the README ({where}) runs `klayer {command}`, no such command"
    known = help_flags(command)
    used = {t.split("=")[0] for t in tokens[1:] if t.startswith("--")}
    unknown = sorted(used - known)
    assert not unknown, (f"the README ({where}) gives `klayer {' '.join(tokens)}`, but "
                         f"klayer {command} has no {', '.join(unknown)}")
    if where != "bash block" or has_placeholder(tokens):
        return  # inline code names a command or a flag; a bash block line is a command
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _, extra = build_parser().parse_known_args(tokens)
        except SystemExit:
            pytest.fail(f"klayer {' '.join(tokens)} (README, {where}) is refused by the "
                        f"parser: {err.getvalue().strip()}")
    assert not extra, f"klayer {' '.join(tokens)}: not understood: {extra}"


# --- the training options table (docs/training.md) ------------------------------------------


def options_table(text: str) -> list[tuple[str, str]]:
    """(config key cell, flag cell) of each row of the "| config key | flag |" table."""
    start = text.index("| config key | flag |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((cells[0], cells[1]))
    return rows


OPTION_ROWS = options_table(TRAINING.read_text(encoding="utf-8"))
# flags of the table a command lacks, each with a strict xfail test below


def test_options_table_keys_are_config_options():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    keys = [re.match(r"[a-z_]+", span).group() for cell, _ in OPTION_ROWS
            for span in INLINE.findall(cell)]
    assert len(keys) >= 12
    unknown = sorted(set(keys) - fields)
    assert not unknown, f"docs/training.md's options table names unknown config keys: {unknown}"


@pytest.mark.parametrize("command", ["train", "search"])
def test_options_table_flags_exist_in_train_and_search(command):
    """"each a training option usable from a config file, from `klayer train` and
    `klayer search` flags"; every alternative value a|b it shows is a choice there."""
    text = help_text(command)
    flags = set(FLAG.findall(text))
    for _, cell in OPTION_ROWS:
        span = " ".join(INLINE.findall(cell)).replace("\\|", "|")
        if span.startswith("klayer "):
            continue  # a command line of its own, checked above
        tokens = span.split()
        assert tokens and tokens[0].startswith("--"), cell
        missing = sorted({t for t in tokens if t.startswith("--")} - flags)
        assert not missing, f"klayer {command} has no {', '.join(missing)} (docs: {span})"
        for token in tokens:
            if "|" in token:
                for choice in token.split("|"):
                    assert re.search(rf"[{{,]{choice}[,}}]", text), \
                        f"klayer {command}: {choice!r} is not a choice (docs: {span})"
