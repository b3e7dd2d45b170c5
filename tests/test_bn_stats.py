"""PreciseBN: population statistics recomputed with frozen weights, swapped in and out."""


import numpy as np
import pytest

from klayer.levers.augment import Augmentation
from klayer.levers.bn_stats import population_statistics, use_statistics
from klayer.config import TrainConfig
from klayer.nn.network import Network
from klayer.train import train


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    monkeypatch.setattr("klayer.plots.plot_history", lambda *args, **kwargs: None)


def _problem(n=120, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d) + rng.uniform(-1, 1, d)


def _trained_net(X, hidden=(6,), **options):
    """A batch-norm network with moving averages recorded from two batches."""
    net = Network(X.shape[1], list(hidden), batch_norm=True, seed=1, **options)
    for part in (X[:20], X[20:40]):
        net.update_running_stats(net.forward(part, "train").batch_stats)
    return net


def test_full_coverage_mean_is_the_data_mean_and_variance_the_batch_average():
    X = _problem()
    net = _trained_net(X)
    stats = population_statistics(net, X, batch_size=20, num_batches=None, seed=3)
    assert set(stats) == {"running_mean1", "running_var1"}
    s1 = X @ net.params["W1"].T + net.params["b1"]
    np.testing.assert_allclose(stats["running_mean1"], s1.mean(axis=0), rtol=0, atol=1e-12)
    # the batches: consecutive slices of one permutation from a generator seeded with 3
    order = np.random.default_rng(3).permutation(len(X))
    batch_vars = [s1[order[i:i + 20]].var(axis=0) for i in range(0, len(X), 20)]
    np.testing.assert_allclose(stats["running_var1"], np.mean(batch_vars, axis=0),
                               rtol=1e-12, atol=1e-14)
    # the biased per-batch variances average below the variance of all the data
    assert np.all(stats["running_var1"] < s1.var(axis=0))
    assert all(v.dtype == np.float64 for v in stats.values())


def test_one_batch_of_everything_gives_the_data_statistics():
    X = _problem(n=50)
    net = _trained_net(X, hidden=(7, 5))
    stats = population_statistics(net, X, batch_size=50)
    fwd = net.forward(X, "train")
    for l in (1, 2):
        mean, var = fwd.batch_stats[l]
        np.testing.assert_allclose(stats[f"running_mean{l}"], mean, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(stats[f"running_var{l}"], var, rtol=1e-13)


def test_leftover_rows_and_num_batches():
    X = _problem(n=105)
    net = _trained_net(X)
    s1 = X @ net.params["W1"].T + net.params["b1"]
    order = np.random.default_rng(0).permutation(105)
    for num_batches, count in ((None, 5), (2, 2), (99, 5)):  # at most 5 whole batches of 20
        stats = population_statistics(net, X, 20, num_batches, seed=0)
        means = [s1[order[i * 20:(i + 1) * 20]].mean(axis=0) for i in range(count)]
        np.testing.assert_allclose(stats["running_mean1"], np.mean(means, axis=0), atol=1e-12)


def test_network_buffers_unchanged_and_deterministic():
    X = _problem()
    net = _trained_net(X, hidden=(6, 6))
    before = {k: v.copy() for k, v in net.buffers.items()}
    params = {k: v.copy() for k, v in net.params.items()}
    a = population_statistics(net, X, 20, num_batches=3, seed=5)
    b = population_statistics(net, X, 20, num_batches=3, seed=5)
    c = population_statistics(net, X, 20, num_batches=3, seed=6)
    assert net.buffers.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(net.buffers[k], before[k])
        assert not np.shares_memory(a[k], net.buffers[k])
    for k in params:
        np.testing.assert_array_equal(net.params[k], params[k])
    assert a.keys() == b.keys() == c.keys() == before.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # other batches, other numbers
    assert any(not np.allclose(a[k], before[k]) for k in a)  # not the moving averages


def test_float32_network_gets_float32_buffers():
    X = _problem()
    net = Network(8, [6], seed=1, dtype="float32")
    stats = population_statistics(net, X.astype(np.float32), 20)
    assert all(v.dtype == np.float32 for v in stats.values())
    stats64 = population_statistics(_trained_net(X), X, 20)
    np.testing.assert_allclose(stats["running_mean1"], stats64["running_mean1"], rtol=1e-4,
                               atol=1e-5)


def test_augmentation_changes_the_statistics_reproducibly():
    X = np.random.default_rng(0).standard_normal((40, 3072))
    net = Network(3072, [4], seed=0)
    aug = Augmentation(flip=True, translate=3)
    plain = population_statistics(net, X, 10, seed=1)
    a = population_statistics(net, X, 10, seed=1, augment=aug)
    b = population_statistics(net, X, 10, seed=1, augment=aug)
    np.testing.assert_array_equal(a["running_var1"], b["running_var1"])
    assert not np.allclose(a["running_var1"], plain["running_var1"])


def test_use_statistics_swaps_buffers_and_returns_the_old_ones():
    X = _problem()
    net = _trained_net(X)
    moving = net.buffers
    moving_copy = {k: v.copy() for k, v in moving.items()}
    scores_moving = net.scores(X)
    stats = population_statistics(net, X, 20)
    old = use_statistics(net, stats)
    assert old is moving
    for k in stats:
        np.testing.assert_array_equal(net.buffers[k], stats[k])
        assert not np.shares_memory(net.buffers[k], stats[k])
        np.testing.assert_array_equal(old[k], moving_copy[k])
    assert not np.allclose(net.scores(X), scores_moving)
    back = use_statistics(net, old)
    for k in stats:
        np.testing.assert_array_equal(back[k], stats[k])
    np.testing.assert_array_equal(net.scores(X), scores_moving)
    with pytest.raises(ValueError, match="do not match"):
        use_statistics(net, {"running_mean1": stats["running_mean1"]})


def test_use_statistics_on_a_network_without_moving_averages():
    X = _problem()
    net = Network(8, [6], seed=1)
    with pytest.raises(ValueError, match="moving averages"):
        net.scores(X)
    old = use_statistics(net, population_statistics(net, X, 20))
    assert old == {} and net.running_initialised
    assert net.scores(X).shape == (len(X), 10)


def test_errors():
    X = _problem()
    with pytest.raises(ValueError, match="batch norm"):
        population_statistics(Network(8, [6], batch_norm=False), X)
    with pytest.raises(ValueError, match="batch norm"):
        population_statistics(Network(8, [6], batch_norm=False, layer_norm=True), X)
    net = _trained_net(X)
    for bad in (1, 0, -5):
        with pytest.raises(ValueError, match="batch_size"):
            population_statistics(net, X, batch_size=bad)
    with pytest.raises(ValueError, match="fewer than one batch"):
        population_statistics(net, X[:19], batch_size=20)
    with pytest.raises(ValueError, match="num_batches"):
        population_statistics(net, X, batch_size=20, num_batches=0)


# --- PreciseBN in training ------------------------------------------------------------------


def test_train_with_precise_bn(data):
    config = TrainConfig(hidden_sizes=(16, 12), n_s=10, cycles=1, batch_size=20, eta_max=0.5,
                         evals_per_cycle=2, precise_bn=5, seed=4)
    result = train(config, data)
    moving, precise = result.final_moving_average, result.final
    assert moving is not None
    assert set(precise) >= {"train_loss", "val_loss", "test_loss", "test_accuracy"}
    assert set(moving) == set(precise)
    assert moving["test_accuracy"] != precise["test_accuracy"] \
        or moving["val_loss"] != precise["val_loss"]
    # the moving-average numbers are the last history row's (and the test set's)
    assert moving["val_loss"] == result.history[-1]["val_loss"]
    net = result.network
    expected = population_statistics(net, data.X_train, batch_size=config.batch_size,
                                     num_batches=config.precise_bn, seed=config.seed)
    assert net.buffers.keys() == expected.keys() == {"running_mean1", "running_var1",
                                                     "running_mean2", "running_var2"}
    for k in expected:
        np.testing.assert_array_equal(net.buffers[k], expected[k])
    # final is the network as returned, evaluated with the recomputed statistics
    assert precise["val_loss"] == pytest.approx(net.evaluate(data.X_val, data.y_val)["loss"],
                                                rel=1e-14)
    assert "final_moving_average" in result.summary()


def test_train_without_precise_bn_keeps_moving_averages(data):
    config = TrainConfig(hidden_sizes=(16, 12), n_s=10, cycles=1, batch_size=20, eta_max=0.5,
                         evals_per_cycle=2, seed=4)
    result = train(config, data)
    assert result.final_moving_average is None
    assert "final_moving_average" not in result.summary()
    precise = train(config.replace(precise_bn=5), data)
    # the same training: identical weights, different statistics
    for k, v in result.network.params.items():
        np.testing.assert_array_equal(precise.network.params[k], v)
    assert precise.final_moving_average == result.final


def test_precise_bn_needs_batch_norm():
    with pytest.raises(ValueError, match="precise_bn"):
        TrainConfig(batch_norm=False, precise_bn=3)
