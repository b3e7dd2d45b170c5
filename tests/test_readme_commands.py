"""The command lines of the README and the docs use only flags that exist.

Every ``klayer <command> ...`` line of README.md and of the Markdown files under docs/,
experiments/ and benchmarks/ — in their fenced bash blocks and in their inline code —
names a registered command, and every ``--flag`` on it is one that ``klayer <command>
--help`` lists. Every ``python experiments/….py`` and ``python benchmarks/….py`` line
names a script that exists, whose ``--help`` lists each flag it uses, and is parsed whole
by the script's own argparse (placeholders such as DIR replaced by a value) in a process
that stops the script right after parsing: nothing is trained or timed. The bash blocks'
lines without placeholders (DIR, N, a|b) are also parsed by the real parser, which must
accept them whole: no unknown argument, no bad value, no missing argument. The training
options table (docs/training.md) names config keys that exist and flags that both
`klayer train` and `klayer search` take. This catches a page that documents a flag or a
choice that no longer exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from klayer.cli import COMMANDS, build_parser, main
from klayer.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TRAINING = REPO / "docs" / "training.md"
DOCS = [README, *sorted((REPO / "docs").rglob("*.md")), REPO / "experiments" / "README.md",
        REPO / "benchmarks" / "README.md"]
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # may wrap onto a second line
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def shell_lines(text: str) -> list[tuple[str, str]]:
    """(where, line) of every line of a page's fenced shell blocks (continued lines joined)
    and of its inline code."""
    lines = []
    for block in FENCED.finditer(text):
        if block.group(1) in ("bash", "sh", "shell", "console", ""):
            body = re.sub(r"\\\n\s*", " ", block.group(2))  # continued lines, joined
            lines += [("bash block", line) for line in body.splitlines()]
    prose = FENCED.sub("", text)
    lines += [("inline code", " ".join(span.replace("\\|", "|").split()))
              for span in INLINE.findall(prose)]
    return lines


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(where, tokens after "klayer") of every klayer command line in the README."""
    found = []
    for where, line in shell_lines(text):
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


def _all_commands() -> list:
    unique = {}
    for path in DOCS:
        name = path.relative_to(REPO)
        for where, tokens in readme_commands(path.read_text(encoding="utf-8")):
            unique.setdefault(tuple(tokens), (f"{name}, {where}", tokens))
    return list(unique.values())


COMMAND_LINES = _all_commands()


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
    assert command in COMMANDS, f"the README ({where}) runs `klayer {command}`, no such command"
    known = help_flags(command)
    used = {t.split("=")[0] for t in tokens[1:] if t.startswith("--")}
    unknown = sorted(used - known)
    assert not unknown, (f"the README ({where}) gives `klayer {' '.join(tokens)}`, but "
                         f"klayer {command} has no {', '.join(unknown)}")
    if not where.endswith("bash block") or has_placeholder(tokens):
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
        assert not missing, f"klayer {command} has no {', '.join(missing)} (README: {span})"
        for token in tokens:
            if "|" in token:
                for choice in token.split("|"):
                    assert re.search(rf"[{{,]{choice}[,}}]", text), \
                        f"klayer {command}: {choice!r} is not a choice (README: {span})"


# --- python experiments/….py and python benchmarks/….py lines ---------------------------------

SCRIPT = re.compile(r"(experiments|benchmarks)/[A-Za-z0-9_]+\.py")


def script_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every ``python experiments|benchmarks/x.py ...`` line."""
    found = []
    for where, line in shell_lines(text):
        line = re.sub(r"(^|\s)#.*$", "", line)
        for part in line.split("&&"):
            tokens = [t.strip("[]") for t in part.split()]
            tokens = [t for t in tokens if t]
            for i, token in enumerate(tokens[:-1]):
                if token in ("python", "python3") and SCRIPT.fullmatch(tokens[i + 1]):
                    found.append((where, tokens[i + 1], tokens[i + 2:]))
                    break
    return found


def _all_script_commands() -> list:
    unique = {}
    for path in DOCS:
        name = path.relative_to(REPO)
        for where, script, args in script_commands(path.read_text(encoding="utf-8")):
            unique.setdefault((script, *args), (f"{name}, {where}", script, args))
    return list(unique.values())


SCRIPT_LINES = _all_script_commands()

# Runs the scripts' argument parsing only, all in one process: argparse's parse_args is
# replaced by one that parses and then stops the script (nothing is loaded, trained or
# timed), and the peers PyTorch and JAX, which only the benchmarks' work needs, are
# stand-ins (importing them takes seconds each).
PARSE_ONLY = r"""
import argparse, contextlib, importlib.abc, importlib.machinery, io, json, runpy, sys
from unittest import mock

class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "jax", "jaxlib"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__ = []
        return module
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, StandIn())

class Parsed(BaseException):
    pass

original = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_only
results = []
for script, argv in json.loads(sys.argv[1]):
    sys.path.insert(0, script.rpartition("/")[0])
    sys.argv = [script, *argv]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        status = "ran without parsing its arguments"
    except Parsed:
        status = "parsed"
    except SystemExit as exc:
        status = f"exit {exc.code}"
    sys.path.remove(script.rpartition("/")[0])
    results.append({"status": status, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def filled(args: list[str]) -> list[str]:
    """The arguments with each placeholder (DIR, K, …) replaced by a value, 1, that any
    path, number or width list accepts."""
    return ["1" if has_placeholder([t]) else t for t in args]


@pytest.fixture(scope="module")
def parsed_scripts() -> dict:
    """{(script, *argv): result} for every script line, and each script's --help."""
    runs = []
    for _, script, args in SCRIPT_LINES:
        if (REPO / script).is_file():
            runs += [[script, ["--help"]], [script, filled(args)]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(runs)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {(script, *argv): result for (script, argv), result in zip(runs, results)}


def test_the_docs_have_script_lines():
    scripts = {script for _, script, _ in SCRIPT_LINES}
    assert {"experiments/seeds.py", "experiments/levers.py",
            "benchmarks/bench_step.py"} <= scripts
    assert len(SCRIPT_LINES) >= 15


@pytest.mark.parametrize("where, script, args", SCRIPT_LINES,
                         ids=[" ".join([s, *a]) for _, s, a in SCRIPT_LINES])
def test_script_line_uses_existing_flags(where, script, args, parsed_scripts):
    assert (REPO / script).is_file(), f"{where} runs {script}, which does not exist"
    usage = parsed_scripts[(script, "--help")]
    assert usage["status"] == "exit 0", usage
    own, _, passed_on = (args[:args.index("--")], "--", args[args.index("--") + 1:]) \
        if "--" in args else (args, "", [])
    used = {t.split("=")[0] for t in own if t.startswith("--")}
    unknown = sorted(used - set(FLAG.findall(usage["out"])))
    assert not unknown, f"{where}: `python {script} {' '.join(args)}`: no {', '.join(unknown)}"
    if passed_on:  # experiments/seeds.py passes what follows -- to klayer train
        assert script == "experiments/seeds.py", (where, args)
        unknown = sorted({t.split("=")[0] for t in passed_on if t.startswith("--")}
                         - help_flags("train"))
        assert not unknown, f"{where}: klayer train has no {', '.join(unknown)}"
    result = parsed_scripts[(script, *filled(args))]
    assert result["status"] == "parsed", \
        f"{where}: `python {script} {' '.join(args)}` is refused: {result['err'].strip()}"
