"""``klayer search`` over the options of "Beyond the study", through the command line only.

README: every extended technique is "a training option usable from a config file, from
`klayer train` and `klayer search` flags, and as a search dimension"; "a trial that
diverges or has a bad parameter is recorded as failed with its reason"; the objective is
the final or the best validation accuracy; random draws may use TPE. Each search here is
a search file written by the test and run with ``klayer.cli.main(["search", ...])`` on
300 images of each split of the real CIFAR-10, a [10] network and 10 update steps.

All searches run once, in a module fixture (one process: the data is loaded once), and
the tests read their trials.csv, run folders and printed output.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import optuna
import pytest

from klayer.cli import main
from klayer.config import TrainConfig

BASE = {"hidden_sizes": [10], "n_s": 5, "cycles": 1, "batch_size": 50, "subset": 300,
        "dtype": "float32", "eta_max": 0.01, "seed": 0}

# option -> (the two values searched, base options it needs)
OPTIONS = {
    "dropout": ([0.0, 0.2], {}),
    "label_smoothing": ([0.0, 0.1], {}),
    "norm_position": (["before", "after"], {}),
    "residual": ([False, True], {"hidden_sizes": [10, 10]}),  # a skip needs equal widths
    "flip": ([False, True], {}),
    "translate": ([0, 2], {}),
    "jitter": ([0.0, 0.1], {}),
    "optimizer": (["sgd", "adam"], {}),
    "precise_bn": ([0, 2], {}),
}
# two-option grids that also hold an invalid combination (one FAIL trial each)
PAIRS = {
    "layer_norm": ({"batch_norm": [True, False], "layer_norm": [False, True]},
                   {"batch_norm": True, "layer_norm": True},
                   "batch_norm and layer_norm are alternatives"),
    "schedule": ({"schedule": ["cyclic", "cosine"], "warmup_steps": [0, 2]},
                 {"schedule": "cyclic", "warmup_steps": 2},
                 "warmup_steps does not apply to the cyclic schedule"),
}
# every extended option, and the search that varies it
DIMENSIONS = {**{name: name for name in OPTIONS}, "layer_norm": "layer_norm",
              "schedule": "schedule", "warmup_steps": "schedule"}


def search_file(path: Path, data_dir, space: dict, base: dict = None, **search) -> Path:
    """A search TOML: the base options, then [search] and one table per dimension
    (json.dumps writes these numbers, strings, booleans and lists as TOML does)."""
    options = {**BASE, **(base or {}), "data_dir": str(data_dir)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    lines += ["[search]"] + [f"{k} = {json.dumps(v)}" for k, v in search.items()]
    for name, entry in space.items():
        lines += [f"[search.space.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Search:
    """One ``klayer search`` command: exit status, printed output, trials.csv rows."""

    def __init__(self, toml: Path, out: Path, *flags: str):
        self.out = out
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            self.status = main(["search", "--config", str(toml), "--out", str(out),
                                "--quiet", *flags])
        self.stdout, self.stderr = stdout.getvalue(), stderr.getvalue()
        with open(out / "trials.csv", newline="", encoding="utf-8") as f:
            self.rows = list(csv.DictReader(f))

    def complete(self) -> list[dict]:
        return [r for r in self.rows if r["state"] == "COMPLETE"]


def cell(text: str, like):
    """A trials.csv cell as the type of ``like``."""
    if isinstance(like, bool):
        assert text in ("True", "False", "true", "false"), text
        return text.lower() == "true"
    return type(like)(text)


def history(run_dir) -> list[dict]:
    with open(Path(run_dir) / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def searches(cifar_dir, tmp_path_factory):
    """Every search of this file, run once."""
    tmp = tmp_path_factory.mktemp("search_options")
    done = {}

    def run(name, space, base=None, flags=(), **search):
        toml = search_file(tmp / f"{name}.toml", cifar_dir, space, base, **search)
        done[name] = Search(toml, tmp / name, *flags)

    with pytest.MonkeyPatch.context() as mp:
        # the curves of each run are drawn by plots tested elsewhere; here they cost time
        mp.setattr("klayer.plots.plot_history", lambda *args, **kwargs: None)
        for name, (values, base) in OPTIONS.items():
            objective = "best" if name == "dropout" else "final"
            run(name, {name: {"choice": values}}, base, method="grid", objective=objective)
        for name, (space, _, _) in PAIRS.items():
            run(name, {k: {"choice": v} for k, v in space.items()}, method="grid")
        # the dropout trials again with the other objective
        run("dropout_final", {"dropout": {"choice": OPTIONS["dropout"][0]}},
            flags=("--objective", "final"), method="grid", objective="best")
        # TPE draws of λ: twice with seed 0, once with seed 1; no run folders
        lam = {"lam": {"log_uniform": [1e-4, 1e-1]}}
        tpe = ("--sampler", "tpe", "--no-runs")
        run("tpe_a", lam, flags=tpe, method="random", n_trials=2, seed=0)
        run("tpe_b", lam, flags=tpe, method="random", n_trials=2, seed=0)
        run("tpe_c", lam, flags=(*tpe, "--search-seed", "1"), method="random", n_trials=2,
            seed=0)
        # nothing valid to train
        run("all_bad", {"layer_norm": {"choice": [True]}}, {"batch_norm": True},
            method="grid")
    return done


# --- every extended option is a search dimension ------------------------------------------


@pytest.mark.slow
@pytest.mark.cifar
@pytest.mark.parametrize("option", DIMENSIONS)
def test_option_is_a_search_dimension(searches, option):
    """Both values of the option trained (COMPLETE trials), trials.csv shows them, and
    each trial's run folder config.toml holds the value of its row."""
    search = searches[DIMENSIONS[option]]
    assert search.status == 0, search.stdout + search.stderr
    values = OPTIONS[option][0] if option in OPTIONS else \
        PAIRS[DIMENSIONS[option]][0][option]
    complete = search.complete()
    assert {cell(r[option], values[0]) for r in complete} == set(values)
    for row in complete:
        config = TrainConfig.from_toml(Path(row["run_dir"]) / "config.toml")
        assert getattr(config, option) == cell(row[option], values[0])
        assert int(row["seed"]) == config.seed
        if option == "layer_norm" and config.layer_norm:  # trained without batch norm
            assert row["batch_norm"] == "False" and not config.batch_norm
    if option == "residual":
        assert all(TrainConfig.from_toml(Path(r["run_dir"]) / "config.toml").hidden_sizes
                   == (10, 10) for r in complete)


@pytest.mark.slow
@pytest.mark.cifar
def test_precise_bn_trial_recomputes_the_statistics(searches):
    """precise_bn = 2 keeps the moving-average results beside the PreciseBN ones."""
    for row in searches["precise_bn"].complete():
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert ("final_moving_average" in summary) == (row["precise_bn"] == "2")


# --- objective: final or best -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cifar
def test_objective_best_and_final_on_the_same_trials(searches):
    best, final = searches["dropout"], searches["dropout_final"]
    assert "objective = validation accuracy (best over the history points)" in \
        (best.out / "trials.md").read_text()
    assert "objective = validation accuracy (final)" in (final.out / "trials.md").read_text()
    pairs = {}
    for search in (best, final):
        assert search.status == 0 and len(search.complete()) == 2
        for row in search.complete():
            pairs.setdefault(row["dropout"], []).append(row)
    differ = 0
    for row_best, row_final in pairs.values():
        assert row_best["seed"] == row_final["seed"]  # the same trial
        vals = [float(r["val_accuracy"]) for r in history(row_best["run_dir"])]
        assert vals == [float(r["val_accuracy"]) for r in history(row_final["run_dir"])]
        assert float(row_best["val_accuracy"]) == max(vals)
        assert float(row_final["val_accuracy"]) == vals[-1]
        for row in (row_best, row_final):  # both numbers are kept either way
            assert float(row["val_accuracy_best"]) == max(vals)
            assert float(row["val_accuracy_final"]) == vals[-1]
        differ += max(vals) != vals[-1]
    assert differ, "no trial's best history point beat its final one: nothing was tested"


@pytest.mark.slow
@pytest.mark.cifar
def test_objective_picks_best_toml(searches):
    """best.toml is the trial with the highest objective."""
    for search in (searches["dropout"], searches["dropout_final"]):
        top = max(search.complete(), key=lambda r: float(r["val_accuracy"]))
        best = TrainConfig.from_toml(search.out / "best.toml")
        assert (best.dropout, best.seed) == (float(top["dropout"]), int(top["seed"]))


# --- TPE ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cifar
def test_tpe_random_search_runs_n_trials_reproducibly(searches):
    a, b, c = searches["tpe_a"], searches["tpe_b"], searches["tpe_c"]
    for search in (a, b, c):
        assert search.status == 0, search.stdout + search.stderr
        assert len(search.rows) == 2 and len(search.complete()) == 2
        assert all(1e-4 <= float(r["lam"]) <= 1e-1 for r in search.rows)
        assert not (search.out / "runs").exists()  # --no-runs
        study = optuna.load_study(study_name="search",
                                  storage=f"sqlite:///{search.out / 'study.db'}")
        assert study.user_attrs["klayer_search"]["sampler"] == "tpe"
    draws = [[r["lam"] for r in s.rows] for s in (a, b, c)]
    assert draws[0] == draws[1]  # same seed, same λ draws (to the last digit)
    assert len(set(draws[0])) == 2  # two different draws
    assert draws[2] != draws[0]  # another seed, other draws
    assert [r["val_accuracy"] for r in a.rows] == [r["val_accuracy"] for r in b.rows]


# --- invalid combinations ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cifar
@pytest.mark.parametrize("name", PAIRS)
def test_invalid_combination_is_a_failed_trial_with_its_reason(searches, name):
    space, bad, reason = PAIRS[name]
    search = searches[name]
    failed = [r for r in search.rows if r["state"] == "FAIL"]
    assert len(search.rows) == 4 and len(search.complete()) == 3 and len(failed) == 1
    row = failed[0]
    assert {k: cell(row[k], v[0]) for k, v in space.items()} == bad
    assert row["fail_reason"].startswith("bad parameter:") and reason in row["fail_reason"]
    assert row["val_accuracy"] == ""  # nothing trained, no objective
    assert not (search.out / "runs" / f"search-{int(row['trial']):04d}").exists()
    # the command goes on and succeeds; it says what failed and why
    assert search.status == 0
    assert "4 trials (3 complete, 1 failed)" in search.stdout
    assert f"FAIL: bad parameter: config: {reason}" in search.stdout
    assert reason in (search.out / "trials.md").read_text()
    assert (search.out / "best.toml").is_file()


@pytest.mark.slow
@pytest.mark.cifar
def test_search_where_no_trial_can_run(searches):
    search = searches["all_bad"]
    assert search.status != 0
    assert "1 trials (0 complete, 1 failed)" in search.stdout
    assert "no trial finished" in search.stdout
    assert search.rows[0]["state"] == "FAIL"
    assert "batch_norm and layer_norm are alternatives" in search.rows[0]["fail_reason"]
    assert not (search.out / "best.toml").exists()
