"""klayer search trains trials in populations: which trials go together, and that each
trial's numbers and run folder are its member's of ``train_population`` (real CIFAR-10,
300-image subsets, n_s = 5)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from klayer import modelfile, runs
from klayer.cli import main
from klayer.config import TrainConfig
from klayer.config import SHARED_OPTIONS, check_population
from klayer.search import dataset_for, parse_search, run_search
from klayer.search.driver import group_configs
from klayer.train import Dropped, train, train_population

from conftest import Stop, stop_at

# --- grouping, without training ---------------------------------------------------------

BASE = TrainConfig(dtype="float64", hidden_sizes=(8,), n_s=5, cycles=1, subset=300,
                   data_seed=0)
PLENTY = 2**40  # bytes: memory never limits these groups


def test_per_member_options_group_and_shared_options_split():
    configs = [
        BASE,                                             # 0
        BASE.replace(lam=0.1, seed=3),                    # 1  λ, seed: per member
        BASE.replace(batch_norm=False),                   # 2  another architecture
        BASE.replace(eta_max=0.05, init=0.01),            # 3  η, σ: per member
        BASE.replace(dropout=0.2, label_smoothing=0.1),   # 4  per member
        BASE.replace(n_s=10, cycles=1),                   # 5  more steps: another stream
        BASE.replace(n_s=2, cycles=1),                    # 6  fewer steps
        BASE.replace(batch_size=50),                      # 7  another stream
        BASE.replace(batch_norm=False, lam=0.2),          # 8  with 2
        BASE.replace(flip=True),                          # 9  augmentation is shared
        BASE.replace(optimizer="adam"),                   # 10 one optimizer per population
        BASE.replace(n_s=10, cycles=1, schedule="cosine"),  # 11 with 5: same total steps
        BASE.replace(hidden_sizes=(9,)),                  # 12
        BASE.replace(dtype="float32"),                    # 13
        BASE.replace(n_s=5, cycles=1, warmup_steps=2, schedule="constant"),  # 14 with 0
    ]
    assert group_configs(configs, 8, PLENTY) == [
        [0, 1, 3, 4, 14], [2, 8], [5, 11], [6], [7], [9], [10], [12], [13]]
    assert configs[0].shared_options() == configs[1].shared_options()
    assert configs[0].shared_options() != configs[2].shared_options()


def test_population_size_and_memory_cap_the_groups():
    configs = [BASE.replace(lam=0.01 * k) for k in range(7)]
    assert group_configs(configs, 3, PLENTY) == [[0, 1, 2], [3, 4, 5], [6]]
    assert group_configs(configs, 1, PLENTY) == [[k] for k in range(7)]
    from klayer.memory import estimate

    parts = estimate(BASE)
    member = sum(parts.values()) - parts["data"]
    two = parts["data"] + 2 * member  # memory for the data once and two members
    assert group_configs(configs, 8, two) == [[0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(ValueError, match="at least 1"):
        group_configs(configs, 0)


def test_which_options_members_share_is_declared_on_the_options():
    # shared: the data, the architecture, the mini-batch stream; the rest is per member
    assert {"hidden_sizes", "batch_size", "optimizer", "flip", "pad_mode", "mixup", "cutmix",
            "whiten", "whiten_eps", "whiten_components", "ema", "subset"} <= set(SHARED_OPTIONS)
    assert not {"lam", "seed", "init", "dropout", "eta_max", "schedule", "precise_bn"} & \
        set(SHARED_OPTIONS)
    # without data_seed, the seed orders the data: other seeds, other streams
    alone = [BASE.replace(data_seed=None), BASE.replace(data_seed=None, seed=1)]
    assert group_configs(alone, 8, PLENTY) == [[0], [1]]
    with pytest.raises(ValueError, match="share data_seed"):
        check_population(alone)
    with pytest.raises(ValueError, match="share mixup"):
        check_population([BASE, BASE.replace(mixup=0.2)])


# --- searches on real data ---------------------------------------------------------------


def tiny(cifar_dir, space, **search) -> dict:
    """A grid search document over a tiny network on 300 images of each split."""
    return {"hidden_sizes": [8], "n_s": 5, "cycles": 1, "subset": 300, "evals_per_cycle": 2,
            "data_dir": str(cifar_dir), "search": {**search, "space": space}}


SPACE = {"lam": {"log_uniform": [1e-4, 1e-1], "grid": 3},
         "label_smoothing": {"choice": [0.0, 0.1]}}


@pytest.fixture(scope="module")
def spec(cifar_dir):
    """Six trials, populations of at most four: one of four and one of two."""
    return parse_search(tiny(cifar_dir, SPACE, population_size=4))


@pytest.fixture(scope="module")
def one_worker(spec, tmp_path_factory):
    return run_search(spec, tmp_path_factory.mktemp("population"), blas_threads=1)


def _config(row) -> TrainConfig:
    return runs.read_config(row["run_dir"]).replace(out=None)


@pytest.mark.cifar
def test_a_search_trains_populations_and_each_trial_is_its_member(spec, one_worker):
    rows = one_worker.rows
    assert [r["state"] for r in rows] == ["COMPLETE"] * 6
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["population"], []).append(row)
    assert sorted(len(g) for g in groups.values()) == [2, 4]  # the cap, 4, is respected
    for first, members in groups.items():
        assert members[0]["trial"] == first  # named after its first trial
        configs = [_config(row) for row in members]
        for row, config in zip(members, configs):  # each trial keeps its own seed
            assert config.seed == row["seed"]
            assert (config.lam, config.label_smoothing) == (row["lam"], row["label_smoothing"])
        assert len({c.seed for c in configs}) == len(configs)
        with threadpool_limits(limits=1, user_api="blas"):
            results = train_population(configs, dataset_for(configs[0]))
        for row, result in zip(members, results):  # bit for bit
            assert row["val_accuracy"] == result.final["val_accuracy"]
            assert row["val_accuracy_best"] == result.best_val_accuracy
            assert row["test_accuracy"] == result.final["test_accuracy"]
            net, _, _ = modelfile.read_model(row["run_dir"])
            for key, value in result.network.params.items():
                np.testing.assert_array_equal(net.params[key], value)
            summary = runs.read_summary(row["run_dir"])
            assert summary["final"] == result.final
            assert summary["timings"]["population_size"] == len(members)
            history = runs.read_history(Path(row["run_dir"]) / runs.HISTORY_FILE)
            assert len(history) == len(result.history)
            # a trial records the validation curve; the training split at the end only
            assert [r["val_accuracy"] for r in history] == \
                [r["val_accuracy"] for r in result.history]
            assert all(np.isnan(r["train_loss"]) for r in history[:-1])
            assert history[-1] == result.history[-1]
    table = list(csv.DictReader(open(one_worker.out / "trials.csv", encoding="utf-8")))
    assert [int(r["population"]) for r in table] == [r["population"] for r in rows]


@pytest.mark.cifar
def test_two_workers_make_the_same_populations_and_results(spec, one_worker, tmp_path):
    two = run_search(spec, tmp_path, workers=2, blas_threads=1)
    keys = ("trial", "lam", "label_smoothing", "seed", "population", "val_accuracy",
            "test_accuracy")
    assert [tuple(r[k] for k in keys) for r in two.rows] == \
        [tuple(r[k] for k in keys) for r in one_worker.rows]
    for row in two.rows:
        assert (Path(row["run_dir"]) / runs.MODEL_FILE).is_file()


@pytest.mark.cifar
def test_no_population_trains_every_trial_alone(cifar_dir, tmp_path, capsys):
    flags = ["search", "--out", str(tmp_path), "--lambda-range", "1e-4,1e-1", "--grid", "3",
             "--batch-norm", "on", "--hidden", "8", "--n-s", "5", "--cycles", "1",
             "--subset", "300", "--evals-per-cycle", "2", "--data-dir", str(cifar_dir),
             "--blas-threads", "1", "--quiet", "--no-population"]
    assert main(flags) == 0
    capsys.readouterr()
    table = list(csv.DictReader(open(tmp_path / "trials.csv", encoding="utf-8")))
    assert len(table) == 3 and all(r["state"] == "COMPLETE" for r in table)
    assert all(r["population"] == "" for r in table)
    for row in table:
        summary = runs.read_summary(row["run_dir"])
        assert "population_size" not in summary["timings"]
        config = runs.read_config(row["run_dir"]).replace(out=None)
        with threadpool_limits(limits=1, user_api="blas"):
            alone = train(config, dataset_for(config))
        assert float(row["val_accuracy"]) == alone.final["val_accuracy"]
    # the search file's `population = false` says the same
    off = parse_search(tiny(cifar_dir, SPACE, population=False))
    assert off.population is False
    assert main(flags[:-1] + ["--population-size", "0"]) == 2
    assert "--population-size" in capsys.readouterr().err


@pytest.mark.cifar
def test_a_diverging_member_fails_and_the_others_complete(cifar_dir, tmp_path):
    doc = tiny(cifar_dir, {"eta_max": {"choice": [0.05, 1e4, 0.02]}})
    doc.update(dtype="float32", n_s=20, batch_norm=False)  # η_max = 1e4 overflows float32
    result = run_search(parse_search(doc), tmp_path, blas_threads=1)
    rows = {r["eta_max"]: r for r in result.rows}
    assert {r["population"] for r in result.rows} == {result.rows[0]["trial"]}  # one population
    assert rows[1e4]["state"] == "FAIL"
    assert rows[1e4]["fail_reason"].startswith("diverged: diverged at update step ")
    assert "not finite" in rows[1e4]["fail_reason"] and rows[1e4]["val_accuracy"] is None
    assert runs.read_summary(rows[1e4]["run_dir"])["diverged"] in rows[1e4]["fail_reason"]
    for eta in (0.05, 0.02):
        assert rows[eta]["state"] == "COMPLETE"
        assert (Path(rows[eta]["run_dir"]) / runs.MODEL_FILE).is_file()
    assert result.counts() == {"complete": 2, "failed": 1, "retried": 0, "other": 0}
    # each member is its member of train_population (the same first member, same order)
    configs = [_config(row) for row in result.rows]  # in trial order: the first orders
    with threadpool_limits(limits=1, user_api="blas"):
        together = train_population(configs, dataset_for(configs[0]))
    for row, member in zip(result.rows, together):
        if row["eta_max"] == 1e4:
            assert isinstance(member, Dropped) and member.reason in row["fail_reason"]
        else:
            assert row["val_accuracy"] == member.final["val_accuracy"]


@pytest.mark.cifar
def test_a_search_killed_in_a_population_runs_that_population_again(cifar_dir, tmp_path):
    """Four trials in two populations of two, trained in the search's own process; the
    test-only KLAYER_FAULT hook kills it (SIGKILL) at step 5 of the second population:
    the first population's two trials are COMPLETE, the second's RUNNING. A rerun keeps
    the first two and trains the other two again, as one population."""
    import os
    import signal
    import subprocess
    import sys

    import optuna

    from klayer.search import INTERRUPTED, storage_url

    command = [sys.executable, "-m", "klayer.cli", "search", "--out", str(tmp_path),
               "--lambda-range", "1e-4,1e-1", "--grid", "4", "--batch-norm", "on",
               "--hidden", "8", "--n-s", "5", "--cycles", "1", "--subset", "300",
               "--evals-per-cycle", "2", "--data-dir", str(cifar_dir), "--quiet",
               "--population-size", "2"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "KLAYER_FAULT": "step:5@2"})
    assert killed.returncode == -signal.SIGKILL, f"not killed:\n{killed.stderr}"

    def trials():
        study = optuna.load_study(study_name="search", storage=storage_url(tmp_path))
        return study.get_trials(deepcopy=False)

    State = optuna.trial.TrialState
    before = trials()
    assert sorted(t.state.name for t in before) == ["COMPLETE"] * 2 + ["RUNNING"] * 2
    complete = {t.number: t for t in before if t.state == State.COMPLETE}
    assert {t.user_attrs["population"] for t in complete.values()} == {min(complete)}

    subprocess.run(command, check=True, capture_output=True, timeout=120)
    after = trials()
    for t in after:
        if t.number in complete:  # kept, not trained again
            assert (t.state, t.value, t.datetime_complete) == \
                (State.COMPLETE, complete[t.number].value, complete[t.number].datetime_complete)
        elif t.number < len(before):
            assert t.state == State.FAIL and t.user_attrs["fail_reason"] == INTERRUPTED
    retries = [t for t in after if t.number >= len(before)]
    assert [t.state for t in retries] == [State.COMPLETE] * 2
    assert {t.user_attrs["population"] for t in retries} == {retries[0].number}
    assert sorted(t.params["lam"] for t in after if t.state == State.COMPLETE) == \
        sorted(t.params["lam"] for t in before)
    for t in retries:
        assert (Path(t.user_attrs["run_dir"]) / runs.SUMMARY_FILE).is_file()


def test_a_population_job_resumes_from_its_checkpoint_folder(data, tmp_path):
    """The study's population jobs (run_trial with a checkpoint_dir): a job stopped after
    its first checkpoints is continued from them, ends as an uninterrupted population,
    and removes the checkpoint folder."""
    from klayer.search import run_trial

    base = TrainConfig(hidden_sizes=(16,), n_s=25, cycles=1, batch_size=20, evals_per_cycle=4,
                       batch_norm=False)
    configs = [base, base.replace(lam=0.05, eta_max=0.05)]
    uninterrupted = train_population(configs, data)
    checkpoint = tmp_path / ".population"
    with pytest.raises(Stop):  # as a killed study would leave it (checkpoint at step 20)
        train_population(configs, data, [stop_at(25)], checkpoint_dir=checkpoint)
    assert runs.load_checkpoint(checkpoint).step == 20
    run_dirs = [tmp_path / "a", tmp_path / "b"]
    job = {"configs": [c.to_dict() for c in configs], "run_dirs": [str(d) for d in run_dirs],
           "checkpoint_dir": str(checkpoint), "blas_threads": 1}
    numbers = run_trial(job, data)
    assert not checkpoint.exists()
    for member, run_dir, want in zip(numbers["members"], run_dirs, uninterrupted):
        assert member["val_accuracy_final"] == want.final["val_accuracy"]
        assert runs.read_history(run_dir / runs.HISTORY_FILE) == want.history
