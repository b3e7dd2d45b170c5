"""One training loop for one network and for a population: every option trains in a
population, each member equal to its run alone on the same data_seed; a search's trials
give the same numbers in populations of any size and alone, and best.toml trained with
``klayer train`` gives the best trial's numbers again."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from klayer import runs
from klayer.cli import main
from klayer.config import TrainConfig
from klayer.search import dataset_for
from klayer.train import TrainResult, train, train_population

from conftest import Stop, stop_at


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    monkeypatch.setattr("klayer.plots.plot_history", lambda *args, **kwargs: None)


def _rows(d: int, n: int = 160, seed: int = 0) -> SimpleNamespace:
    """Generated rows of width d, four classes: 100 train, 30 validation, 30 test."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    half = d // 2
    y = (X[:, :half].mean(axis=1) > 0).astype(np.int64) + 2 * (X[:, half:].mean(axis=1) > 0)
    return SimpleNamespace(X_train=X[:100], y_train=y[:100], X_val=X[100:130],
                           y_val=y[100:130], X_test=X[130:], y_test=y[130:])


SMALL, IMAGES = _rows(20), _rows(3072)  # IMAGES: CIFAR-10's width, for augmentation
# 100 steps: 5 batches an epoch, 20 epochs
BASE = TrainConfig(dtype="float64", hidden_sizes=(12, 10), n_s=25, cycles=2, batch_size=20,
                   evals_per_cycle=4, data_seed=11)

OPTIONS = {  # option(s) under test: the data they need
    "plain": ({}, SMALL),
    "no batch norm": ({"batch_norm": False}, SMALL),
    "layer norm, after, residual": ({"batch_norm": False, "layer_norm": True,
                                     "norm_position": "after", "hidden_sizes": (10, 10),
                                     "residual": True}, SMALL),
    "momentum, cosine": ({"optimizer": "momentum", "schedule": "cosine",
                          "warmup_steps": 5}, SMALL),
    "adam, step": ({"optimizer": "adam", "eta_max": 0.01, "schedule": "step",
                    "decay_every": 30}, SMALL),
    "dropout, label smoothing": ({"dropout": 0.2, "label_smoothing": 0.1}, SMALL),
    "precise_bn": ({"precise_bn": 3}, SMALL),
    "ema": ({"ema": 0.9}, SMALL),
    "whiten zca": ({"whiten": "zca", "whiten_eps": 0.1}, SMALL),
    "whiten pca": ({"whiten": "pca", "whiten_components": 8}, SMALL),
    "flip, translate reflect, jitter": ({"flip": True, "translate": 2, "pad_mode": "reflect",
                                         "jitter": 0.1}, IMAGES),
    "translate edge": ({"translate": 3, "pad_mode": "edge"}, IMAGES),
    "mixup": ({"mixup": 0.4}, IMAGES),
    "cutmix, ema, dropout": ({"cutmix": 1.0, "ema": 0.8, "dropout": 0.1}, IMAGES),
}


def _same(got: TrainResult, want: TrainResult, tol: float = 1e-10) -> None:
    """Histories, final numbers and arrays equal to ``tol``."""
    assert [row["step"] for row in got.history] == [row["step"] for row in want.history]
    for g, w in zip(got.history, want.history):
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=tol, abs=tol), key
    assert set(got.final) == set(want.final)
    for key in want.final:
        assert got.final[key] == pytest.approx(want.final[key], rel=tol, abs=tol), key
    for arrays, expected in ((got.network.params, want.network.params),
                             (got.network.buffers, want.network.buffers)):
        assert arrays.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(arrays[key], expected[key], rtol=0, atol=tol,
                                       err_msg=key)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_trains_in_a_population_and_members_equal_runs_alone(name):
    options, data = OPTIONS[name]
    base = BASE.replace(**options)
    configs = [base, base.replace(lam=0.02, seed=3, eta_max=base.eta_max / 2, init=0.1)]
    together = train_population(configs, data)
    assert base.total_steps == 100
    for config, member in zip(configs, together):
        assert isinstance(member, TrainResult) and member.config == config
        _same(member, train(config, data))
    # the members differ (their own seed, λ and η), yet saw one data stream
    assert together[0].final["val_cost"] != pytest.approx(together[1].final["val_cost"])


def test_data_seed_none_is_the_seed_and_keeps_the_config_hash():
    assert TrainConfig().data_seed is None and TrainConfig(seed=4).stream_seed == 4
    assert TrainConfig(seed=4).config_hash() != TrainConfig(seed=4, data_seed=4).config_hash()
    config = BASE.replace(seed=4, data_seed=None, flip=True, batch_norm=False)
    _same(train(config, IMAGES), train(config.replace(data_seed=4), IMAGES), tol=0)
    other = train(config.replace(data_seed=5), IMAGES)  # same weights, other batches
    assert other.history[0]["train_cost"] == train(config, IMAGES).history[0]["train_cost"]
    assert other.final["train_cost"] != train(config, IMAGES).final["train_cost"]


@pytest.mark.parametrize("options,data", [
    ({"ema": 0.9, "mixup": 0.3, "dropout": 0.1, "optimizer": "adam", "eta_max": 0.01}, IMAGES),
    ({"ema": 0.9, "whiten": "pca", "whiten_components": 8, "schedule": "cosine"}, SMALL),
], ids=["ema-mixup-dropout-adam", "ema-whiten"])
def test_a_population_with_every_lever_resumes_bit_identical(tmp_path, options, data):
    base = BASE.replace(**options)
    configs = [base, base.replace(lam=0.01, seed=2)]
    uninterrupted = train_population(configs, data)
    with pytest.raises(Stop):
        train_population(configs, data, [stop_at(57)], checkpoint_dir=tmp_path)
    assert runs.load_checkpoint(tmp_path).step == 55
    resumed = train_population(configs, data, checkpoint_dir=tmp_path, resume=True)
    for got, want in zip(resumed, uninterrupted):
        _same(got, want, tol=0)


def test_one_run_raises_a_population_drops(tmp_path):
    from klayer.train import DivergenceError, Dropped

    bad = BASE.replace(batch_norm=False, schedule="constant", eta_max=1e8)
    with pytest.raises(DivergenceError, match="training diverged at update step"):
        train(bad, SMALL)
    [dropped] = train_population([bad], SMALL, run_dirs=[tmp_path / "run"])
    assert isinstance(dropped, Dropped) and "not finite" in dropped.reason
    assert runs.read_summary(tmp_path / "run")["diverged"] == dropped.reason


def test_a_history_without_the_training_split_trains_the_same_network(tmp_path):
    configs = [BASE.replace(mixup=0.3, ema=0.9), BASE.replace(mixup=0.3, ema=0.9, lam=0.02,
                                                              seed=2)]
    full = train_population(configs, IMAGES)
    lean = train_population(configs, IMAGES, train_history=False,
                            run_dirs=[tmp_path / "a", tmp_path / "b"])
    for got, want in zip(lean, full):
        assert [row["step"] for row in got.history] == [row["step"] for row in want.history]
        for g, w in zip(got.history[:-1], want.history[:-1]):
            assert all(np.isnan(g[f"train_{key}"]) for key in ("loss", "cost", "accuracy"))
            assert {k: g[k] for k in g if not k.startswith("train_")} == \
                {k: w[k] for k in w if not k.startswith("train_")}
        assert got.history[-1] == want.history[-1]  # the last point has every split
        assert got.final == want.final and got.best_val_accuracy == want.best_val_accuracy
        for name, param in want.network.params.items():
            assert np.array_equal(got.network.params[name], param), name
    written = runs.read_history(tmp_path / "a" / runs.HISTORY_FILE)  # NaN survives the CSV
    assert np.isnan(written[0]["train_loss"]) and written[-1] == lean[0].history[-1]


# --- searches on real data ---------------------------------------------------------------

SEARCH = ["--workers", "1", "--hidden", "30,30", "--batch-norm", "on", "--subset", "2000",
          "--n-s", "50", "--cycles", "1", "--grid", "4", "--lambda-range", "1e-4,1e-1",
          "--dtype", "float64", "--no-runs", "--blas-threads", "1", "--quiet"]


def _table(out: Path) -> list[dict]:
    with open(out / "trials.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.cifar
def test_search_numbers_do_not_depend_on_populations_and_best_toml_reproduces(
        cifar_dir, tmp_path, capsys):
    flags = [*SEARCH, "--data-dir", str(cifar_dir)]
    tables = {}
    for name, extra in {"population": [], "pairs": ["--population-size", "2"],
                        "alone": ["--no-population"]}.items():
        assert main(["search", "--out", str(tmp_path / name), *flags, *extra]) == 0
        tables[name] = _table(tmp_path / name)
    capsys.readouterr()
    keys = ("lam", "seed", "val_accuracy", "val_accuracy_best", "test_accuracy")
    numbers = {name: [tuple(row[k] for k in keys) for row in table]
               for name, table in tables.items()}
    assert numbers["population"] == numbers["pairs"] == numbers["alone"]
    assert len({row["population"] for row in tables["population"]}) == 1  # one of four
    assert all(row["population"] == "" for row in tables["alone"])

    best_toml = tmp_path / "population" / "best.toml"
    best = max(tables["population"], key=lambda row: float(row["val_accuracy"]))
    config = TrainConfig.from_toml(best_toml)
    assert config.data_seed == 0 and str(config.seed) == best["seed"]
    assert main(["train", "--config", str(best_toml), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    summary = runs.read_summary(tmp_path / "again")
    assert summary["final"]["val_accuracy"] == float(best["val_accuracy"])
    with threadpool_limits(limits=1, user_api="blas"):  # and in Python, to 1e-10
        alone = train(config.replace(out=None), dataset_for(config))
    assert alone.final["val_accuracy"] == float(best["val_accuracy"])


@pytest.mark.cifar
def test_a_search_says_when_trials_cannot_share_a_stream(cifar_dir, tmp_path):
    from klayer.search import parse_search, run_search

    doc = {"hidden_sizes": [8], "n_s": 5, "cycles": 1, "subset": 300, "evals_per_cycle": 2,
           "data_dir": str(cifar_dir), "dtype": "float64",
           "search": {"space": {"batch_size": {"choice": [50, 100]},
                                "lam": {"choice": [0.001, 0.01]}}}}
    events = []
    result = run_search(parse_search(doc), tmp_path, blas_threads=1, on_event=events.append)
    notes = [e.note for e in events if e.kind == "note"]
    assert notes == ["trials with different batch_size cannot share a mini-batch stream (or "
                     "number of steps): only trials with equal values train together"]
    by_size: dict = {}
    for row in result.rows:
        by_size.setdefault(row["batch_size"], set()).add(row["population"])
    assert all(len(populations) == 1 for populations in by_size.values())  # λ pairs
    assert len({p for ps in by_size.values() for p in ps}) == 2
