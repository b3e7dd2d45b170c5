"""EMA of the weights: the recursion and its warm-up, in-place copies of its own, a
checkpoint round trip that continues bit for bit, swapping in and out, and batch-norm
statistics that belong to the averaged weights."""

import numpy as np
import pytest

from klayer.levers.bn_stats import population_statistics
from klayer.levers.ema import EMA
from klayer.nn.network import Network


def _params(seed, shapes=(("W1", (4, 3)), ("b1", (4,)))):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in shapes}


def test_decay_schedule():
    ema = EMA(0.99)
    assert [ema.decay_at(t) for t in (1, 8, 80, 1000)] == \
        [2 / 11, 9 / 18, 0.9, 0.99]  # (1+t)/(10+t) until it reaches the decay
    assert EMA(0.99, warmup=False).decay_at(1) == 0.99


@pytest.mark.parametrize("warmup", [True, False])
def test_update_follows_the_recursion(warmup):
    ema = EMA(0.9, warmup=warmup)
    sequence = [_params(s) for s in range(30)]
    want = {k: v.copy() for k, v in sequence[0].items()}
    for t, p in enumerate(sequence):
        ema.update(p)
        if t:
            d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
            want = {k: d * want[k] + (1 - d) * p[k] for k in want}
    assert ema.step == 30
    for k in want:
        np.testing.assert_allclose(ema.params[k], want[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", [(700, 400), (3, 300, 500)])  # one network, a population
def test_weights_larger_than_a_block_average_as_the_whole_array_would(shape):
    """Weights of more than one block (klayer.nn.optim.BLOCK entries) are averaged block by
    block: the same bits as θ_ema + (1 - d)(θ - θ_ema) on the whole array."""
    from klayer.nn.optim import BLOCK
    assert np.prod(shape) > 2 * BLOCK
    first, second = (_params(s, (("W1", shape), ("b1", (7,)))) for s in (1, 2))
    first = {k: v.astype(np.float32) for k, v in first.items()}
    second = {k: v.astype(np.float32) for k, v in second.items()}
    ema = EMA(0.99)
    ema.update(first)
    ema.update(second)
    d = np.float32(1 - ema.decay_at(1))
    for k in first:
        want = first[k] + (second[k] - first[k]) * d
        np.testing.assert_array_equal(ema.params[k], want)


def test_averages_are_copies_updated_in_place():
    p = _params(0)
    ema = EMA(0.5)
    ema.update(p)
    arrays = dict(ema.params)
    assert all(not np.shares_memory(arrays[k], p[k]) for k in p)
    for k in p:
        p[k] += 1.0  # the training step changes the weights in place
    ema.update(p)
    assert all(ema.params[k] is arrays[k] for k in p)  # same arrays, new values
    np.testing.assert_allclose(ema.params["W1"], p["W1"] - 1 + (1 - ema.decay_at(1)))


def test_constant_weights_stay_exact_and_noise_is_averaged_out():
    target = _params(1)
    ema = EMA(0.99, warmup=False)
    for _ in range(5):
        ema.update(target)
    for k in target:
        np.testing.assert_array_equal(ema.params[k], target[k])
    # weights jittering around a target: the average is far closer to it than any iterate
    rng = np.random.default_rng(2)
    ema = EMA(0.99)
    for _ in range(3000):
        noisy = {k: v + rng.standard_normal(v.shape) for k, v in target.items()}
        ema.update(noisy)
    error = np.abs(ema.params["W1"] - target["W1"]).max()
    assert error < 0.5 * np.abs(noisy["W1"] - target["W1"]).max() and error < 0.4


def test_float32_kept():
    p = {k: v.astype(np.float32) for k, v in _params(3).items()}
    ema = EMA(0.9)
    ema.update(p)
    ema.update(p)
    assert all(v.dtype == np.float32 for v in ema.params.values())


def test_state_dict_round_trip_continues_bit_for_bit(tmp_path):
    sequence = [_params(s) for s in range(20)]
    buffers = [{"running_mean1": p["b1"] * 2} for p in sequence]
    whole = EMA(0.95)
    for p, b in zip(sequence, buffers):
        whole.update(p, b)
    first = EMA(0.95)
    for p, b in zip(sequence[:8], buffers[:8]):
        first.update(p, b)
    np.savez(tmp_path / "ema.npz", **first.state_dict())
    with np.load(tmp_path / "ema.npz", allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    resumed = EMA(0.95)
    resumed.load_state_dict(state)
    for p, b in zip(sequence[8:], buffers[8:]):
        resumed.update(p, b)
    assert resumed.step == whole.step == 20
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k])
    np.testing.assert_array_equal(resumed.buffers["running_mean1"],
                                  whole.buffers["running_mean1"])


@pytest.mark.parametrize("state,match", [
    ({"params/W1": np.zeros(2)}, "no step count"),
    ({"step": 3, "velocity/W1": np.zeros(2)}, "unexpected EMA entry"),
    ({"step": 3}, "inconsistent"),
    ({"step": 0, "params/W1": np.zeros(2)}, "inconsistent"),
])
def test_load_state_dict_refuses_other_states(state, match):
    with pytest.raises(ValueError, match=match):
        EMA().load_state_dict(state)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, float("nan"), True, "0.9"])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(decay)


def test_other_network_refused():
    ema = EMA()
    ema.update(_params(0))
    with pytest.raises(ValueError, match="another network"):
        ema.update({"W1": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="no weights yet"):
        EMA().swap_into(Network(3, [4], batch_norm=False))


# --- evaluation with the averaged weights ------------------------------------------------


def _trained(batch_norm=True, steps=40, decay=0.9, seed=0):
    """A small network trained by SGD for a few steps, its EMA updated after each."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((200, 6)) * rng.uniform(0.5, 2, 6) + rng.uniform(-1, 1, 6)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    net = Network(6, [8, 5], 2, batch_norm=batch_norm, seed=seed)
    ema = EMA(decay)
    for step in range(steps):
        batch = rng.choice(200, 40, replace=False)
        result = net.loss(X[batch], y[batch], 0.01)
        for k, g in result.grads.items():
            net.params[k] -= 0.2 * g
        net.update_running_stats(result.batch_stats)
        ema.update(net.params, net.buffers)
    return net, ema, X


def test_averaged_swaps_the_weights_in_and_back_even_on_error():
    net, ema, X = _trained()
    params, buffers = net.params, net.buffers
    values = {k: v.copy() for k, v in {**params, **buffers}.items()}
    with ema.averaged(net):
        for k in params:
            np.testing.assert_array_equal(net.params[k], ema.params[k])
            assert not np.shares_memory(net.params[k], ema.params[k])  # evaluation can't harm it
        for k in buffers:
            np.testing.assert_array_equal(net.buffers[k], ema.buffers[k])
        averaged_scores = net.scores(X)
    assert net.params is params and net.buffers is buffers
    assert not np.allclose(averaged_scores, net.scores(X))
    with pytest.raises(RuntimeError):
        with ema.averaged(net):
            raise RuntimeError("evaluation failed")
    assert net.params is params and net.buffers is buffers
    for k, v in {**net.params, **net.buffers}.items():
        np.testing.assert_array_equal(v, values[k])


def test_recomputed_statistics_belong_to_the_averaged_weights():
    """With bn_data, the buffers are PreciseBN's for θ_ema: one batch of all rows makes
    eval mode reproduce train mode exactly, which neither the live moving averages nor
    their EMA do."""
    net, ema, X = _trained()
    with ema.averaged(net, bn_data=X, batch_size=len(X), num_batches=None):
        recomputed = dict(net.buffers)
        eval_scores = net.scores(X, "eval")
        train_scores = net.forward(X, "train").scores
        assert ema.buffers.keys() == recomputed.keys()
    np.testing.assert_allclose(eval_scores, train_scores, rtol=1e-6, atol=1e-9)
    with ema.averaged(net):
        averaged_gap = np.abs(net.scores(X, "eval") - train_scores).max()
    assert averaged_gap > 1e-3  # the averaged buffers are only an approximation
    # the same statistics as PreciseBN on a network holding the averaged weights
    twin = Network.from_hyperparameters(net.hyperparameters())
    twin.params = {k: v.copy() for k, v in ema.params.items()}
    stats = population_statistics(twin, X, 50, None, seed=4)
    with ema.averaged(net, bn_data=X, batch_size=50, num_batches=None, seed=4):
        for k in stats:
            np.testing.assert_array_equal(net.buffers[k], stats[k])


def test_without_batch_norm_only_the_weights_move():
    net, ema, X = _trained(batch_norm=False)
    assert ema.buffers == {} and net.buffers == {}
    with ema.averaged(net):
        np.testing.assert_array_equal(net.params["W1"], ema.params["W1"])
        assert net.buffers == {}


def test_batch_norm_without_averaged_buffers_or_data_is_refused():
    net, _, X = _trained()
    ema = EMA()
    ema.update(net.params)  # buffers never given
    params = net.params
    with pytest.raises(ValueError, match="pass bn_data"):
        with ema.averaged(net):
            pass
    assert net.params is params  # put back
