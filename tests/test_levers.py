"""experiments/levers.py: its soft-target loss is the library's cross-entropy for one-hot
targets (and mixes it linearly otherwise), and the script runs end to end on a few
real images."""

import importlib.util

import numpy as np
import pytest

from conftest import REPO_ROOT
from klayer.levers.augment import soft_targets
from klayer.nn.network import Network


@pytest.fixture(scope="module")
def levers():
    spec = importlib.util.spec_from_file_location("levers", REPO_ROOT / "experiments" / "levers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _net_and_batch(dropout=0.0):
    rng = np.random.default_rng(0)
    net = Network(12, [9, 7], 4, batch_norm=True, dropout=dropout, seed=1)
    return net, rng.standard_normal((30, 12)), rng.integers(0, 4, 30)


def test_soft_target_loss_with_one_hot_targets_is_the_library_loss(levers):
    net, X, y = _net_and_batch(dropout=0.3)
    masks = net.dropout_masks(30, np.random.default_rng(2))
    want = net.loss(X, y, 0.01, masks=masks)
    cost, grads, stats = levers.soft_target_loss(net, X, np.eye(4)[y], 0.01, masks)
    assert cost == pytest.approx(want.cost, rel=1e-12)
    for k in want.grads:
        np.testing.assert_allclose(grads[k], want.grads[k], rtol=1e-10, atol=1e-14)
    for l in stats:
        np.testing.assert_array_equal(stats[l][0], want.batch_stats[l][0])


def test_soft_target_loss_is_linear_in_the_targets(levers):
    net, X, y = _net_and_batch()
    y_b = (y + 1) % 4
    T = soft_targets(y, y_b, 0.3, 4)
    cost, grads, _ = levers.soft_target_loss(net, X, T, 0.0, None)
    a, b = net.loss(X, y), net.loss(X, y_b)
    assert cost == pytest.approx(0.3 * a.cost + 0.7 * b.cost, rel=1e-12)
    np.testing.assert_allclose(grads["W1"], 0.3 * a.grads["W1"] + 0.7 * b.grads["W1"],
                               rtol=1e-9, atol=1e-14)


@pytest.mark.cifar
def test_script_runs_and_prints_the_table(levers, cifar_dir, capsys):
    levers.main(["--data-dir", str(cifar_dir), "--epochs", "1", "--subset", "600",
                 "--variants", "baseline", "reflect", "mixup", "cutmix", "--bn-batches", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | test | Δ test | +EMA | +TTA")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["baseline", "reflect", "mixup",
                                                            "cutmix"]
    for r in rows[1:]:
        accuracy = float(r.split("|")[2].strip().rstrip("%"))
        assert 0 <= accuracy <= 100
