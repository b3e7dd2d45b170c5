"""Hostile command lines: each ends with one line ``klayer <cmd>: error: ...``, status 2,
no traceback, and nothing already on disk touched; and no generated input makes the
command line raise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klayer import cli
from klayer.config import TrainConfig, flag_name

REPO_ROOT = Path(__file__).resolve().parent.parent

# Files each row may use (created in tmp_path before the command runs).
FILES = {
    "latin1.toml": b'init = "h\xe9"\n',
    "garbage.toml": b"this is = = not toml\n",
    "unknown.toml": b"hidden_sizes = [50]\nlearning_rate = 0.1\n",
    "types.toml": b'n_s = "many"\n',
    "hidden.toml": b"hidden_sizes = 50\n",
    "bignum.toml": b"cycles = 1e400\n",
    "grid.toml": (b'[search]\nmethod = "grid"\n[search.space.lam]\n'
                  b"log_uniform = [1e-5, 1e-1]\ngrid = 100000000\n"),
    "search_latin1.toml": b'[search]\nmethod = "gr\xefd"\n',
    "huge_search.toml": (b'[search]\nmethod = "grid"\n[search.space.hidden_sizes]\n'
                         b"choice = [[8], [10000000]]\n"),
}

ROWS = [
    # (argv, what stderr must mention)
    (["train", "--n-s", "0"], "argument --n-s"),
    (["train", "--n-s", "abc"], "n_s must be an integer"),
    (["train", "--lambda", "-1"], "argument --lambda"),
    (["train", "--lambda", "nan"], "lam must be a finite number"),
    (["train", "--eta-max", "inf"], "eta_max must be a finite number"),
    (["train", "--hidden", "50,,50"], "comma-separated positive integers"),
    (["train", "--hidden", "50,-3"], "argument --hidden"),
    (["train", "--hidden", "0"], "argument --hidden"),
    (["train", "--dtype", "float16"], "invalid choice"),
    (["train", "--schedule", "linear"], "invalid choice"),
    (["train", "--init", "glorot"], "init must be one of he, xavier"),
    (["train", "--dropout", "1"], "dropout must be a number in [0, 1)"),
    (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["train", "--batch-size", "1"], "batch_size must be an integer >= 2 with batch norm"),
    (["train", "--eta-min", "1", "--eta-max", "0.1"], "must not exceed eta_max"),
    (["train", "--translate", "20"], "translate must be under 16"),
    (["train", "--precise-bn", "3", "--no-batch-norm"], "precise_bn"),
    (["train", "--config", "missing.toml"], "config file missing.toml does not exist"),
    (["train", "--config", "folder"], "config file folder is a folder"),
    (["train", "--config", "latin1.toml"], "latin1.toml: not a TOML file"),
    (["train", "--config", "garbage.toml"], "garbage.toml: not valid TOML"),
    (["train", "--config", "unknown.toml"], "unknown.toml: unknown config key(s) learning_rate"),
    (["train", "--config", "types.toml"], "types.toml: config: n_s must be an integer"),
    (["train", "--config", "hidden.toml"], "hidden_sizes must be a list"),
    (["train", "--config", "bignum.toml"], "cycles must be an integer"),
    (["train", "--resume", "folder", "--lambda", "0.1"], "drop --lambda"),
    (["train", "--hidden", "10000000"], "GiB available"),
    (["gradcheck", "--h", "0"], "argument --h: h must be a finite number > 0"),
    (["gradcheck", "--h", "-1e-5"], "argument --h"),
    (["gradcheck", "--samples", "0"], "argument --samples"),
    (["gradcheck", "--dims", "0"], "argument --dims"),
    (["gradcheck", "--tol", "-1"], "argument --tol"),
    (["gradcheck", "--floor", "0"], "argument --floor"),
    (["gradcheck", "--hidden", "a,b"], "argument --hidden"),
    (["gradcheck", "--order", "3"], "invalid choice"),
    (["gradcheck", "--init", "-2"], "argument --init"),
    (["search", "--n-s", "0"], "argument --n-s"),
    (["search", "--lambda-range", "1"], "argument --lambda-range"),
    (["search", "--workers", "0"], "argument --workers"),
    (["search", "--grid", "1"], "argument --grid: grid must be an integer >= 2"),
    (["search", "--lambda-range", "1e-5,1e-1", "--grid", "100000000"],
     "100,000,000 points, more than --max-grid"),
    (["search", "--config", "grid.toml"], "more than --max-grid"),
    (["search", "--config", "folder"], "search file folder is a folder"),
    (["search", "--config", "search_latin1.toml"], "search_latin1.toml: not a TOML file"),
    (["search", "--config", "missing.toml"], "search file missing.toml does not exist"),
    (["search", "--config", "huge_search.toml"], "the largest trial of this search needs"),
    (["evaluate", "missing_run"], "holds no saved klayer model"),
    (["evaluate", "folder"], "folder holds no saved klayer model"),
    (["predict", "folder", "keep.txt"], "folder holds no saved klayer model"),
    (["predict"], "the following arguments are required: RUN, IMAGE"),
    (["export", "folder"], "folder holds no saved klayer model"),
    (["export", "folder", "--format", "tflite"], "argument --format: invalid choice"),
    (["data", "--data-dir", "missing", "--no-download"], "missing (from --data-dir) does not exist"),
    (["reproduce", "--workers", "0"], "--workers must be at least 1"),
    (["reproduce", "--out", "keep.txt", "--quick"], "--out keep.txt is a file"),
    (["reproduce", "--quick", "--data-dir", "missing"], "missing (from --data-dir) does not exist"),
    (["gradcheck", "--cifar", "--data-dir", "missing"], "missing (from --data-dir) does not exist"),
    (["train", "--data-dir", "missing", "--subset", "10"], "missing (from --data-dir) does not exist"),
]


def _prepare(tmp_path: Path) -> dict:
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder").mkdir()
    keep = tmp_path / "keep.txt"
    keep.write_text("already computed\n")
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in tmp_path.iterdir()}


@pytest.mark.parametrize("argv, mention", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_hostile_command_line_is_one_line_error(argv, mention, tmp_path):
    before = _prepare(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "KLAYER_DATA": str(tmp_path / "no")}
    done = subprocess.run([sys.executable, "-m", "klayer.cli", *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"klayer {argv[0]}: error: "), lines[0]
    assert mention in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
             for p in tmp_path.iterdir()}
    assert after == before  # nothing created (no runs/, no searches/), nothing changed


def test_closed_stdout_ends_quietly(tmp_path):
    """A reader that went away (``klayer ... | head -1``) ends the command with status
    141 and no message."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "klayer.cli", "gradcheck", "--hidden", "4", "--dims", "3",
             "--samples", "4"], cwd=tmp_path, env=env, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == cli.BROKEN_PIPE and done.stderr == ""


# --- property: whatever the input, the command line answers 0 or 2 and never raises -------

_OPTIONS = sorted(TrainConfig.__dataclass_fields__)
_junk_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-5, 10**9), max_size=4), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["he", "xavier", "float32", "adam", "cosine", "single", "after"]),
    st.integers(0, 300), st.floats(0, 1),
)
_keys = st.one_of(st.sampled_from(_OPTIONS), st.text(min_size=1, max_size=10))
_flag_words = st.one_of(
    st.sampled_from([flag_name(o) for o in _OPTIONS] + ["--no-batch-norm", "--flip",
                                                        "--no-flip", "--quiet", "--name"]),
    st.text(max_size=8),
    st.sampled_from(["0", "-1", "1e400", "nan", "50,,50", "", "none", "abc", "2", "0.5"]),
)


_search_tables = st.fixed_dictionaries({}, optional={
    "method": st.one_of(st.sampled_from(["grid", "random", "coarse-to-fine"]), _junk_values),
    "n_trials": st.one_of(st.integers(-2, 5), _junk_values),
    "seed": _junk_values,
    "space": st.dictionaries(
        _keys, st.one_of(_junk_values, st.fixed_dictionaries({}, optional={
            "log_uniform": st.one_of(st.lists(st.floats(1e-6, 1), min_size=2, max_size=2),
                                     _junk_values),
            "choice": st.one_of(st.lists(st.booleans(), max_size=3), _junk_values),
            "grid": st.one_of(st.integers(-1, 10**9), _junk_values)})), max_size=3),
})


def _toml_value(value) -> str | None:
    """TOML text of a generated value (inline tables for dicts; None: leave the key out)."""
    from klayer.config import toml_value

    if value is None:
        return None
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        items = [(k, _toml_value(v)) for k, v in value.items()]
        return "{" + ", ".join(f"{toml_value(k)} = {v}" for k, v in items if v is not None) + "}"
    if isinstance(value, list):
        items = [_toml_value(v) for v in value]
        return "[" + ", ".join(v for v in items if v is not None) + "]"
    return toml_value(value)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["train", "search"]),
       options=st.dictionaries(_keys, _junk_values, max_size=5),
       search=st.one_of(st.none(), _search_tables),
       flags=st.lists(_flag_words, max_size=6))
def test_generated_configs_and_flags_never_raise(command, options, search, flags,
                                                 tmp_path_factory):
    folder = tmp_path_factory.mktemp("prop")
    if search is not None:
        options = {**options, "search": search}
    text = _toml_value(options)[1:-1]  # the top-level table's "key = value" entries
    config = folder / "gen.toml"
    config.write_text("\n".join(_split_top_level(text)) + "\n", encoding="utf-8")
    argv = [command, "--config", str(config), *flags]
    # Finding CIFAR-10 is where a valid configuration would start training: refuse there.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr("klayer.data.load_cifar10", _no_data)
        mp.setattr("klayer.data.load_data", _no_data)
        mp.setattr("klayer.data.ensure_cifar10", _no_data)
        status = cli.main(argv)
    assert status in (0, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["gen.toml"]


def _split_top_level(text: str) -> list[str]:
    """The entries of an inline table's body, one per line (commas outside brackets and
    strings separate them)."""
    entries, depth, start, quoted, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if quoted:
            quoted = not (ch == '"' and not escaped)
            escaped = ch == "\\" and not escaped
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            entries.append(text[start:i].strip())
            start = i + 1
    entries.append(text[start:].strip())
    return [e for e in entries if e]


def _no_data(*args, **kwargs):
    raise OSError("no data in this test")


# --- klayer's own bugs are not the user's errors ------------------------------------------


def _planted_bug(*args, **kwargs):
    raise ValueError("planted: an internal ValueError")


def test_an_internal_error_is_exit_1_one_line_and_a_logged_traceback(monkeypatch, capsys,
                                                                      tmp_path):
    """A ValueError that is not a UserError is klayer's bug: status 1, one line saying so
    and where the traceback is, never ``error: ...`` with status 2."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KLAYER_DEBUG", raising=False)
    monkeypatch.setattr("klayer.nn.gradcheck.check_gradients_for", _planted_bug)
    status = cli.main(["gradcheck", "--hidden", "4", "--dims", "3", "--samples", "4"])
    err = capsys.readouterr().err
    assert status == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    log = tmp_path / "cache" / "klayer" / "last-error.log"
    assert lines[0].startswith("klayer gradcheck: internal error (a bug in klayer")
    assert "ValueError: planted: an internal ValueError" in lines[0]
    assert f"traceback in {log}" in lines[0] and "--debug" in lines[0]
    assert ": error:" not in lines[0]
    text = log.read_text()
    assert "Traceback" in text and "_planted_bug" in text


def test_debug_lets_an_internal_error_through(monkeypatch):
    monkeypatch.setattr("klayer.nn.gradcheck.check_gradients_for", _planted_bug)
    with pytest.raises(ValueError, match="planted"):
        cli.main(["--debug", "gradcheck", "--hidden", "4", "--dims", "3", "--samples", "4"])


def test_a_user_error_raised_deep_inside_is_exit_2(monkeypatch, capsys):
    """The same place raising klayer.nn.errors.UserError is the user's error."""
    from klayer.nn.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("planted: fix your input")

    monkeypatch.setattr("klayer.nn.gradcheck.check_gradients_for", refuse)
    status = cli.main(["gradcheck", "--hidden", "4", "--dims", "3", "--samples", "4"])
    assert status == 2
    assert capsys.readouterr().err == "klayer gradcheck: error: planted: fix your input\n"


def test_an_internal_error_in_a_new_process_is_exit_1(tmp_path):
    """The whole path in a fresh interpreter: a planted bug (a ValueError from NumPy on
    an impossible reshape, raised inside the command) gives status 1 and one line."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import klayer.nn.gradcheck as G\n"
        "def broken(*a, **k):\n"
        "    import numpy as np\n"
        "    np.zeros(3).reshape(2, 2)\n"
        "G.check_gradients_for = broken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plant), str(REPO_ROOT)]),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("KLAYER_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "klayer.cli", "gradcheck", "--hidden", "4",
                           "--dims", "3", "--samples", "4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("klayer gradcheck: internal error (a bug in klayer")
    assert "cannot reshape" in done.stderr and "Traceback" not in done.stderr
    assert "Traceback" in (tmp_path / "cache" / "klayer" / "last-error.log").read_text()
