"""Mini-batches gathered into one reused buffer: the same runs, bit for bit, as gathering
every epoch's permutation of the training set with fancy indexing."""

from types import SimpleNamespace

import numpy as np
import pytest

from klayer.config import TrainConfig
from klayer.train import Batches, train, train_population


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    monkeypatch.setattr("klayer.plots.plot_history", lambda *args, **kwargs: None)


class EpochGather:
    """The plain way: one fancy-indexed copy of the training set per permutation, each
    batch a slice of it (what the loops did before :class:`klayer.train.Batches`)."""

    def __init__(self, X, y, batch_size):
        self.X, self.y, self.batch_size, self.order = X, y, batch_size, None

    def __call__(self, order, j):
        if self.order is not order:
            self.order, self.X_epoch, self.y_epoch = order, self.X[order], self.y[order]
        rows = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return self.X_epoch[rows], self.y_epoch[rows]


@pytest.fixture(scope="module")
def images():
    """110 generated rows of CIFAR-10 width (3072), 4 classes: 80 train (not a multiple of
    the batch, so each epoch skips some), 30 validation."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((110, 3072))
    y = (X[:, :1536].mean(axis=1) > 0).astype(np.int64) + 2 * (X[:, 1536:].mean(axis=1) > 0)
    return SimpleNamespace(X_train=X[:80], y_train=y[:80], X_val=X[80:], y_val=y[80:])


def _assert_same_networks(got, want):
    assert got.params.keys() == want.params.keys() and got.buffers.keys() == want.buffers.keys()
    for arrays, expected in ((got.params, want.params), (got.buffers, want.buffers)):
        for key in expected:
            np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)


def _plain(monkeypatch):
    monkeypatch.setattr("klayer.train.Batches", EpochGather)


def test_batches_reuse_one_buffer_and_hold_the_permuted_rows():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((23, 5)).astype(np.float32), rng.integers(0, 10, 23)
    order = rng.permutation(23)
    batches = Batches(X, y, 4)
    first, _ = batches(order, 0)
    for j in range(23 // 4):
        Xb, yb = batches(order, j)
        np.testing.assert_array_equal(Xb, X[order][4 * j:4 * j + 4])
        np.testing.assert_array_equal(yb, y[order][4 * j:4 * j + 4])
        assert Xb is first and Xb.dtype == np.float32 and Xb.flags.c_contiguous


BASE = TrainConfig(dtype="float64", hidden_sizes=(12, 8), n_s=4, cycles=2, batch_size=30,
                   eta_max=0.2, evals_per_cycle=2)


@pytest.mark.parametrize("options", [
    {},
    {"dtype": "float32"},
    {"dropout": 0.2, "flip": True, "translate": 2, "jitter": 0.1},
    {"mixup": 0.2, "optimizer": "adam", "eta_max": 0.01},
])
def test_training_equals_gathering_each_epoch(images, monkeypatch, options):
    config = BASE.replace(**options)
    got = train(config, images)
    assert got.epochs > 2  # several permutations, each with a skipped remainder
    _plain(monkeypatch)
    want = train(config, images)
    _assert_same_networks(got.network, want.network)
    assert got.history == want.history


def test_population_equals_gathering_each_epoch(images, monkeypatch):
    configs = [BASE.replace(flip=True, translate=2, dropout=0.1),
               BASE.replace(flip=True, translate=2, lam=0.01, seed=4, eta_max=0.1,
                            data_seed=0)]
    got = train_population(configs, images)
    _plain(monkeypatch)
    want = train_population(configs, images)
    for g, w in zip(got, want):
        _assert_same_networks(g.network, w.network)
        assert g.history == w.history
