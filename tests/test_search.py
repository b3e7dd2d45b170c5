"""klayer.search and ``klayer search``: the space, the grid, resuming, workers, Ray, failures.

Searches here train tiny networks (8 hidden units, a few dozen steps) on 500-image
subsets of the real CIFAR-10 (the ``cifar_dir`` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest

from klayer.cli import main
from klayer.config import TrainConfig
from klayer.search import (INTERRUPTED, Dimension, load_search, log_grid, parse_search,
                           run_search, storage_url, trial_seed)

REPO = Path(__file__).resolve().parent.parent
COURSE_REPORT_LAMBDAS = ["1.00e-05", "3.73e-05", "1.39e-04", "5.18e-04", "1.93e-03", "7.20e-03",
                       "2.68e-02", "1.00e-01"]


def tiny(cifar_dir, space, **search) -> dict:
    """A search document over a tiny network on 500 images of each split."""
    return {"hidden_sizes": [8], "n_s": 10, "cycles": 1, "subset": 500, "evals_per_cycle": 2,
            "data_dir": str(cifar_dir), "search": {"save_runs": False, **search, "space": space}}


def by_params(rows, names):
    """{(option values): (seed, val_accuracy)} of the finished trials."""
    return {tuple(r[n] for n in names): (r["seed"], r["val_accuracy"])
            for r in rows if r["state"] == "COMPLETE"}


# --- the space, without training ------------------------------------------------------------


def test_lambda_grid_is_the_course_reports():
    assert [f"{v:.2e}" for v in log_grid(1e-5, 1e-1, 8)] == COURSE_REPORT_LAMBDAS
    spec = load_search(REPO / "configs" / "search_lambda.toml")
    lam, bn = spec.space
    assert [f"{v:.2e}" for v in lam.values()] == COURSE_REPORT_LAMBDAS
    assert bn.values() == [True, False]
    assert (spec.method, spec.base.hidden_sizes, spec.base.n_s, spec.base.cycles) == \
        ("grid", (50, 50), 900, 2)


def test_fine_search_config_loads():
    spec = load_search(REPO / "configs" / "search_lambda_fine.toml")
    assert spec.method == "random" and spec.n_trials >= 4
    assert [d.name for d in spec.space] == ["lam"]


@pytest.mark.parametrize("space, search, message", [
    ({"lam": {"log_uniform": [1e-5, 1e-1]}}, {}, "grid = N"),
    ({"lam": {"log_uniform": [0, 1e-1], "grid": 3}}, {}, "low > 0"),
    ({"lam": {"log_uniform": [1e-1, 1e-5], "grid": 3}}, {}, "low < high"),
    ({"lam": {"uniform": [0, 1], "choice": [1]}}, {}, "exactly one"),
    ({"lamda": {"choice": [0.1]}}, {}, "not a searchable"),
    ({"out": {"choice": ["a"]}}, {}, "not a searchable"),
    ({"lam": {"log_uniform": [1e-5, 1e-1]}}, {"method": "random"}, "needs n_trials"),
    ({}, {}, "space is empty"),
    ({"lam": {"choice": [0.1]}}, {"methd": "grid"}, "unknown [search] key"),
])
def test_bad_search_files_are_clear_errors(space, search, message):
    doc = {"n_s": 10, "search": {**search, "space": space}}
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_search(doc)


def test_fine_round_is_one_grid_step_around_the_best():
    spec = load_search(REPO / "configs" / "search_lambda.toml")
    grid = spec.space[0].values()
    fine = spec.fine_round({"lam": grid[5], "batch_norm": True})
    lam, bn = fine.space
    assert (fine.name, fine.method, fine.n_trials) == ("fine", "random", spec.fine_trials)
    assert lam.low == pytest.approx(grid[4]) and lam.high == pytest.approx(grid[6])
    assert bn == Dimension("batch_norm", "choice", choices=(True,))
    edge = spec.fine_round({"lam": grid[0], "batch_norm": False}).space[0]
    assert (edge.low, edge.high) == (pytest.approx(grid[0]), pytest.approx(grid[1]))


def test_trial_seed_depends_only_on_the_options():
    a = trial_seed(0, {"lam": 0.01, "batch_norm": True})
    assert a == trial_seed(0, {"batch_norm": True, "lam": 0.01})
    assert a != trial_seed(0, {"lam": 0.02, "batch_norm": True})
    assert a != trial_seed(1, {"lam": 0.01, "batch_norm": True})
    assert trial_seed(0, {"seed": 7, "lam": 0.01}) == 7


# --- searches on real data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_spec(cifar_dir):
    """Four random draws of λ (log-uniform) and batch norm on/off."""
    return parse_search(tiny(cifar_dir, {"lam": {"log_uniform": [1e-4, 1e-1]},
                                         "batch_norm": {"choice": [True, False]}},
                             method="random", n_trials=4, seed=3,
                             population=False))  # one job per trial: what workers run


@pytest.fixture(scope="module")
def one_worker(random_spec, tmp_path_factory):
    """The reference: one worker, one BLAS thread (results are bit-identical only at equal
    BLAS threads per trial, see klayer.search.make_executor)."""
    return run_search(random_spec, tmp_path_factory.mktemp("one-worker"), workers=1,
                      blas_threads=1)


# A probe loaded into every new Python process through sitecustomize (test-only; the
# driver, already running, never loads it). It adds a training callback (through the
# fault-injection hook point, klayer.runs.fault_callbacks) that, at a trial's first step,
# writes the process id and the BLAS threads threadpoolctl sees there, then waits until
# trials have started in two different processes. A pool of two workers passes that
# barrier at once; trials run in one process would wait out the timeout and leave one
# pid, and trials run in the driver leave no probe file at all: no race either way.
PROBE = """
import os, sys
if os.environ.get("KLAYER_TEST_PROBE"):
    sys.path.insert(0, {root!r})  # the klayer under test, as in the driver
    import json, time
    from pathlib import Path
    from threadpoolctl import threadpool_info
    import klayer.runs as runs

    folder = Path(os.environ["KLAYER_TEST_PROBE"])
    fault_callbacks = runs.fault_callbacks

    def probe(event):
        if event.kind != "step" or event.step != 1:
            return
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        n = len(list(folder.glob(f"{{os.getpid()}}-*.json")))
        (folder / f"{{os.getpid()}}-{{n}}.json").write_text(json.dumps(blas))
        deadline = time.monotonic() + 120
        while (len({{f.name.split("-")[0] for f in folder.glob("*.json")}}) < 2
               and time.monotonic() < deadline):
            time.sleep(0.05)

    runs.fault_callbacks = lambda: [probe, *fault_callbacks()]
"""


@pytest.mark.cifar
def test_two_workers_give_the_same_results_as_one(random_spec, one_worker, tmp_path,
                                                  monkeypatch):
    import klayer

    site, probes = tmp_path / "site", tmp_path / "probes"
    site.mkdir()
    probes.mkdir()
    root = str(Path(klayer.__file__).resolve().parent.parent)
    (site / "sitecustomize.py").write_text(PROBE.format(root=root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("KLAYER_TEST_PROBE", str(probes))
    two = run_search(random_spec, tmp_path / "search", workers=2, blas_threads=1)
    names = ("lam", "batch_norm")
    assert len(one_worker.rows) == len(two.rows) == 4
    assert by_params(two.rows, names) == by_params(one_worker.rows, names)
    assert len(by_params(two.rows, names)) == 4  # four different draws

    # the four trials ran in two worker processes, neither of them this one ...
    files = sorted(probes.glob("*.json"))
    pids = {int(f.name.split("-")[0]) for f in files}
    assert len(files) == 4 and len(pids) == 2 and os.getpid() not in pids
    # ... each limited to the BLAS threads asked for (OpenBLAS would use every core)
    assert all(json.loads(f.read_text()) == [1] for f in files), \
        {f.name: f.read_text() for f in files}


def test_pool_workers_share_the_cores_for_blas():
    from klayer.search.executors import PoolExecutor, available_cores, make_executor

    cores = available_cores()
    assert make_executor(2).blas_threads == max(1, cores // 2)
    assert make_executor(3, blas_threads=2).blas_threads == 2
    assert make_executor(1).blas_threads == cores
    assert isinstance(make_executor(2), PoolExecutor) and make_executor(2).pool is None


@pytest.mark.cifar
def test_failing_trials_are_recorded_and_the_search_goes_on(cifar_dir, tmp_path):
    doc = tiny(cifar_dir, {"eta_max": {"choice": [0.05, 1e4, -1.0]}}, save_runs=True)
    doc.update(dtype="float32", n_s=20)  # η_max = 1e4 overflows float32 within 20 steps
    result = run_search(parse_search(doc), tmp_path)
    rows = {r["eta_max"]: r for r in result.rows}
    assert len(rows) == 3
    assert rows[0.05]["state"] == "COMPLETE" and rows[0.05]["fail_reason"] is None
    assert rows[1e4]["state"] == "FAIL" and rows[1e4]["fail_reason"].startswith("diverged:")
    assert rows[-1.0]["state"] == "FAIL" and "bad parameter" in rows[-1.0]["fail_reason"]
    assert (Path(rows[0.05]["run_dir"]) / "summary.json").is_file()
    assert result.best["eta_max"] == 0.05
    assert TrainConfig.from_toml(tmp_path / "best.toml") == result.best_config
    table = (tmp_path / "trials.md").read_text()
    assert table.count("| FAIL |") == 2 and "diverged" in table
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 4
    assert result.counts() == {"complete": 1, "failed": 2, "retried": 0, "other": 0}

    kept = run_search(parse_search(doc), tmp_path, keep_failed=True)
    assert [(r["trial"], r["state"]) for r in kept.rows] == \
        [(r["trial"], r["state"]) for r in result.rows]  # nothing run again

    again = run_search(parse_search(doc), tmp_path)  # the failed trials are run again
    assert again.counts() == {"complete": 1, "failed": 2, "retried": 2, "other": 0}
    retries = {r["trial"]: r for r in again.rows[3:]}
    assert sorted((r["eta_max"], r["state"]) for r in retries.values()) == \
        [(-1.0, "FAIL"), (1e4, "FAIL")]
    assert sorted(again.retried) == sorted(("search", rows[v]["trial"]) for v in (1e4, -1.0))
    assert again.rows[:3] == result.rows  # the first trials are kept as they were


@pytest.mark.cifar
def test_a_worker_killed_mid_trial_fails_it_and_a_rerun_finishes(cifar_dir, tmp_path,
                                                                  monkeypatch):
    """A worker process that dies (here: the test hook kills it at step 3, in every
    worker) fails its trial; the next run of the search runs it again."""
    spec = parse_search(tiny(cifar_dir, {"lam": {"choice": [0.01, 0.001]}}, save_runs=True))
    monkeypatch.setenv("KLAYER_FAULT", "step:3")  # inherited by the spawned workers
    killed = run_search(spec, tmp_path, workers=2, blas_threads=1)
    assert killed.counts() == {"complete": 0, "failed": 2, "retried": 0, "other": 0}
    assert all(r["fail_reason"].startswith("BrokenProcessPool") for r in killed.rows)
    monkeypatch.delenv("KLAYER_FAULT")
    again = run_search(spec, tmp_path, workers=2, blas_threads=1)
    assert again.counts() == {"complete": 2, "failed": 0, "retried": 2, "other": 0}
    for row in again.rows[2:]:
        assert (Path(row["run_dir"]) / "summary.json").is_file()


@pytest.mark.cifar
def test_the_run_folder_of_an_interrupted_trial_is_removed(cifar_dir, tmp_path):
    from klayer.search.studies import open_storage, open_study

    spec = parse_search(tiny(cifar_dir, {"lam": {"choice": [0.01]}}, save_runs=True))
    study = open_study(open_storage(tmp_path), spec.first_round(), spec)
    stale = study.ask()  # left RUNNING, as by a search killed while it trained
    orphan = tmp_path / "runs" / f"search-{stale.number:04d}"
    orphan.mkdir(parents=True)
    (orphan / "config.toml").write_text("")
    stale.set_user_attr("run_dir", str(orphan))
    result = run_search(spec, tmp_path)
    assert not orphan.exists()
    assert [(r["trial"], r["state"], r["fail_reason"]) for r in result.rows] == \
        [(stale.number, "FAIL", INTERRUPTED), (stale.number + 1, "COMPLETE", None)]
    assert (Path(result.rows[1]["run_dir"]) / "summary.json").is_file()


@pytest.mark.cifar
def test_coarse_to_fine_then_nothing_left_to_rerun(cifar_dir, tmp_path):
    doc = tiny(cifar_dir, {"lam": {"log_uniform": [1e-4, 1e-1], "grid": 3}},
               method="coarse-to-fine", fine_trials=2)
    spec = parse_search(doc)
    first = run_search(spec, tmp_path)
    coarse = [r for r in first.rows if r["round"] == "search"]
    fine = [r for r in first.rows if r["round"] == "fine"]
    assert len(coarse) == 3 and len(fine) == 2
    best = max(coarse, key=lambda r: r["val_accuracy"])["lam"]
    for r in fine:  # within one grid step (a factor 10^1.5) of the best coarse λ
        assert best / 10 ** 1.5 * 0.999 <= r["lam"] <= best * 10 ** 1.5 * 1.001
    again = run_search(spec, tmp_path)
    assert [(r["round"], r["trial"], r["val_accuracy"]) for r in again.rows] == \
        [(r["round"], r["trial"], r["val_accuracy"]) for r in first.rows]
    assert (tmp_path / "lambda_search.png").stat().st_size > 0


@pytest.mark.cifar
def test_a_study_of_another_search_is_not_mixed_in(cifar_dir, tmp_path):
    run_search(parse_search(tiny(cifar_dir, {"lam": {"choice": [0.01]}})), tmp_path)
    other = parse_search(tiny(cifar_dir, {"lam": {"choice": [0.02]}}))
    with pytest.raises(ValueError, match="another search"):
        run_search(other, tmp_path)


@pytest.mark.cifar
def test_command_line(cifar_dir, tmp_path, capsys):
    flags = ["search", "--out", str(tmp_path), "--lambda-range", "1e-4,1e-1", "--grid", "2",
             "--batch-norm", "on", "--hidden", "8", "--n-s", "10", "--cycles", "1",
             "--subset", "500", "--evals-per-cycle", "2", "--data-dir", str(cifar_dir),
             "--no-runs", "--quiet"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "| search | 1 | COMPLETE |" in out and "best: search trial" in out
    assert TrainConfig.from_toml(tmp_path / "best.toml").hidden_sizes == (8,)
    assert main(flags + ["--lambda", "0.01"]) == 2
    assert "set by a flag and searched" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.cifar
def test_resume_after_sigkill_keeps_finished_trials(cifar_dir, tmp_path):
    """The search process is killed (SIGKILL, by the test-only KLAYER_FAULT hook) in the
    middle of its 4th trial, after step 5 of 20: exactly three trials are finished and
    one is RUNNING in the study when it dies. A rerun keeps the three, records the
    interrupted one as FAIL and runs its grid point again. (Trials trained one at a time:
    tests/test_search_population.py kills a population.)"""
    command = [sys.executable, "-m", "klayer.cli", "search", "--out", str(tmp_path),
               "--lambda-range", "1e-5,1e-1", "--grid", "8", "--batch-norm", "on",
               "--hidden", "8", "--n-s", "10", "--cycles", "1", "--subset", "500",
               "--evals-per-cycle", "2", "--data-dir", str(cifar_dir), "--no-runs", "--quiet",
               "--no-population"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "KLAYER_FAULT": "step:5@4"})
    assert killed.returncode == -signal.SIGKILL, f"not killed:\n{killed.stderr}"
    before = {t.number: t for t in _trials(tmp_path)}
    running = [n for n, t in before.items() if t.state == optuna.trial.TrialState.RUNNING]
    complete = {n: t for n, t in before.items() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(running) == 1 and len(complete) == 3

    subprocess.run(command, check=True, capture_output=True, timeout=120)

    after = {t.number: t for t in _trials(tmp_path)}
    for n, t in complete.items():  # kept, not rerun
        assert (after[n].state, after[n].value, after[n].datetime_complete) == \
            (t.state, t.value, t.datetime_complete)
    stale = after[running[0]]
    assert stale.state == optuna.trial.TrialState.FAIL
    assert stale.user_attrs["fail_reason"] == INTERRUPTED
    done = [t for t in after.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["lam"] for t in done) == log_grid(1e-5, 1e-1, 8)  # each point once
    assert len(after) == 8 + 1  # the grid and the interrupted trial
    retry = [t for t in done if t.system_attrs.get("failed_trial") == running[0]]
    assert len(retry) == 1 and retry[0].params == stale.params
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 1 + 9


def _schema_ready(db: Path) -> bool:
    """Whether the search has finished creating its tables (Optuna writes version_info
    last). Checked read-only: opening the study earlier would race that creation and
    fail the search with "table ... already exists"."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("SELECT count(*) FROM version_info").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _trials(out: Path, polling: bool = False):
    """The trials of the search in ``out``. While polling a search that is starting, the
    database or the study may not exist yet, or be busy: then none."""
    if not (out / "study.db").exists():
        return []
    if polling and not _schema_ready(out / "study.db"):
        return []
    try:
        study = optuna.load_study(study_name="search", storage=storage_url(out))
        return study.get_trials(deepcopy=False)
    except Exception:
        if polling:
            return []
        raise


@pytest.mark.cifar
def test_the_new_training_options_are_searchable(cifar_dir, tmp_path, capsys):
    """Dropout, the normalization's position, augmentation and label smoothing are
    search dimensions like λ; the flags of klayer train set them in the base config."""
    doc = tiny(cifar_dir, {"dropout": {"choice": [0.0, 0.3]},
                           "norm_position": {"choice": ["before", "after"]}})
    doc.update(flip=True, translate=2, label_smoothing=0.1)
    result = run_search(parse_search(doc), tmp_path / "api")
    done = {(r["dropout"], r["norm_position"]) for r in result.rows if r["state"] == "COMPLETE"}
    assert done == {(0.0, "before"), (0.0, "after"), (0.3, "before"), (0.3, "after")}
    best = result.best_config
    assert (best.flip, best.translate, best.label_smoothing) == (True, 2, 0.1)
    assert (best.dropout, best.norm_position) == (result.best["dropout"],
                                                  result.best["norm_position"])
    flags = ["search", "--out", str(tmp_path / "cli"), "--method", "random", "--n-trials", "2",
             "--lambda-range", "1e-4,1e-1", "--batch-norm", "on", "--hidden", "8",
             "--n-s", "10", "--cycles", "1", "--subset", "500", "--evals-per-cycle", "2",
             "--data-dir", str(cifar_dir), "--no-runs", "--quiet", "--flip", "--dropout",
             "0.2", "--residual", "--optimizer", "adam", "--schedule", "cosine",
             "--eta-max", "0.003"]
    assert main(flags) == 0
    capsys.readouterr()
    best = TrainConfig.from_toml(tmp_path / "cli" / "best.toml")
    assert (best.flip, best.dropout, best.residual, best.optimizer, best.schedule) == \
        (True, 0.2, True, "adam", "cosine")
