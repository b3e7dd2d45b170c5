"""The Network: parameters, modes, moving averages, cost, input checks."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from klayer.nn.network import Network


def _data(n=16, d=12, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def test_parameter_names_and_shapes():
    net = Network(12, [7, 5], 4, batch_norm=True)
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2",
                                "W3", "b3"]
    assert net.params["W1"].shape == (7, 12) and net.params["W3"].shape == (4, 5)
    assert net.num_layers == 3 and net.sizes == [12, 7, 5, 4]
    plain = Network(12, [7, 5], 4, batch_norm=False)
    assert list(plain.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]


def test_two_layer_network_with_no_hidden_layers():
    net = Network(6, [], 3, batch_norm=True)
    assert list(net.params) == ["W1", "b1"]
    X, y = _data(5, 6, classes=3)
    assert net.loss(X, y).grads.keys() == net.params.keys()


@pytest.mark.parametrize("init,std", [("he", np.sqrt(2 / 400)), ("xavier", np.sqrt(1 / 400)),
                                      (1e-3, 1e-3)])
def test_initialisation_scale(init, std):
    net = Network(400, [300], 10, init=init, seed=3)
    assert net.params["W1"].std() == pytest.approx(std, rel=0.02)
    assert np.all(net.params["b1"] == 0)


def test_same_seed_same_weights_across_dtypes():
    a = Network(10, [8], dtype="float64", seed=5)
    b = Network(10, [8], dtype="float32", seed=5)
    assert b.params["W1"].dtype == np.float32
    np.testing.assert_allclose(a.params["W1"], b.params["W1"], rtol=1e-6)
    assert not np.array_equal(a.params["W1"], Network(10, [8], seed=6).params["W1"])


def test_float32_network_computes_in_float32():
    net = Network(12, [8, 6], dtype="float32", seed=1)
    X, y = _data()
    res = net.loss(X, y, lam=0.01)
    assert all(g.dtype == np.float32 for g in res.grads.values())
    net.update_running_stats(res.batch_stats)
    assert net.scores(X).dtype == np.float32


def test_cost_is_loss_plus_l2_penalty():
    net = Network(12, [8], seed=2)
    X, y = _data()
    r = net.loss(X, y, lam=0.1)
    penalty = sum(np.sum(net.params[k] ** 2) for k in ("W1", "W2"))
    assert r.cost == pytest.approx(r.loss + 0.1 * penalty, rel=1e-12)
    r0 = net.loss(X, y, lam=0.0)
    np.testing.assert_allclose(r.grads["W1"] - r0.grads["W1"], 0.2 * net.params["W1"], atol=1e-12)
    np.testing.assert_array_equal(r.grads["b1"], r0.grads["b1"])  # biases are not penalised


def test_first_update_copies_batch_statistics_then_moving_average():
    net = Network(12, [8], seed=0, bn_alpha=0.9)
    X1, y1 = _data(seed=1)
    X2, y2 = _data(seed=2)
    s1 = net.loss(X1, y1, grads=False).batch_stats
    net.update_running_stats(s1)
    np.testing.assert_array_equal(net.buffers["running_mean1"], s1[1][0])
    assert net.buffers["running_mean1"] is not s1[1][0]
    s2 = net.loss(X2, y2, grads=False).batch_stats
    net.update_running_stats(s2)
    np.testing.assert_allclose(net.buffers["running_mean1"], 0.9 * s1[1][0] + 0.1 * s2[1][0])
    np.testing.assert_allclose(net.buffers["running_var1"], 0.9 * s1[1][1] + 0.1 * s2[1][1])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 20), mode=st.sampled_from(["train", "eval"]))
def test_forward_passes_never_change_the_moving_averages(seed, n, mode):
    net = Network(12, [8, 6], seed=seed)
    net.update_running_stats(net.loss(*_data(seed=seed + 1)).batch_stats)
    before = {k: v.copy() for k, v in net.buffers.items()}
    X, y = _data(n, seed=seed)
    net.loss(X, y, lam=0.01, mode=mode)
    net.evaluate(X, y)
    net.predict(X)
    for k in before:
        np.testing.assert_array_equal(net.buffers[k], before[k])


def test_eval_mode_uses_moving_averages_not_the_batch():
    net = Network(12, [8], seed=0)
    X, y = _data(seed=0)
    net.update_running_stats(net.loss(X, y, grads=False).batch_stats)
    # With averages equal to this batch's statistics, eval equals train on this batch ...
    np.testing.assert_allclose(net.forward(X, "eval").scores, net.forward(X, "train").scores,
                               rtol=1e-10)
    # ... and single examples are scored independently of their batch in eval mode.
    one = net.forward(X[:1], "eval").scores
    np.testing.assert_allclose(one, net.forward(X, "eval").scores[:1], rtol=1e-12)


def test_evaluate_chunks_agree_with_one_pass():
    net = Network(12, [8], seed=0)
    X, y = _data(50)
    net.update_running_stats(net.loss(X[:20], y[:20]).batch_stats)
    whole = net.scores(X, chunk=1000)
    np.testing.assert_allclose(net.scores(X, chunk=7), whole, rtol=1e-12)
    ev = net.evaluate(X, y, lam=0.01)
    assert ev["accuracy"] == pytest.approx(np.mean(whole.argmax(1) == y))
    assert ev["cost"] > ev["loss"]


def test_hyperparameters_round_trip():
    net = Network(12, [8, 6], 5, batch_norm=False, init=0.01, dtype="float32", seed=9)
    again = Network.from_hyperparameters(net.hyperparameters())
    assert again.hyperparameters() == net.hyperparameters()
    for k in net.params:
        np.testing.assert_array_equal(again.params[k], net.params[k])


@pytest.mark.parametrize("kwargs,match", [
    ({"input_size": 0}, "input_size"),
    ({"hidden_sizes": [5, -1]}, "hidden_sizes"),
    ({"hidden_sizes": [5, 2.5]}, "hidden_sizes"),
    ({"num_classes": 1}, "num_classes"),
    ({"init": "uniform"}, "init"),
    ({"init": -0.1}, "init"),
    ({"dtype": "int32"}, "dtype"),
    ({"bn_eps": 0}, "bn_eps"),
    ({"bn_alpha": 1.0}, "bn_alpha"),
])
def test_bad_construction_arguments(kwargs, match):
    args = {"input_size": 12, "hidden_sizes": [5], "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        Network(args.pop("input_size"), args.pop("hidden_sizes"), args.pop("num_classes"), **args)


def test_bad_inputs_give_clear_errors():
    net = Network(12, [8], seed=0)
    X, y = _data()
    with pytest.raises(ValueError, match=r"shape \(n, 12\)"):
        net.loss(X[:, :5], y)
    with pytest.raises(ValueError, match="NaN"):
        net.loss(np.full_like(X, np.nan), y)
    with pytest.raises(ValueError, match="labels"):
        net.loss(X, y + 10)
    with pytest.raises(ValueError, match="integer labels"):
        net.loss(X, y.astype(float))
    with pytest.raises(ValueError, match="at least 2"):
        net.loss(X[:1], y[:1])
    with pytest.raises(ValueError, match="mode"):
        net.loss(X, y, mode="test")
    with pytest.raises(ValueError, match="λ"):
        net.loss(X, y, lam=-1)
    with pytest.raises(ValueError, match="moving averages"):
        net.predict(X)
    assert Network(12, [8], batch_norm=False).predict(X).shape == (16,)


def test_batch_norm_without_hidden_layers_evaluates_after_one_step():
    """Network(d, [], C) has no layer to normalise: after one training step it evaluates
    without moving averages, like the same network without batch norm."""
    X, y = _data(classes=5)
    net = Network(12, [], 5, batch_norm=True, seed=0)
    plain = Network(12, [], 5, batch_norm=False, seed=0)
    for n in (net, plain):
        result = n.loss(X, y, lam=0.01)
        n.update_running_stats(result.batch_stats)
        for key, grad in result.grads.items():
            n.params[key] -= 0.1 * grad
    assert not net.batch_norm and net.buffers == {}
    out = net.evaluate(X, y)
    assert out == plain.evaluate(X, y) and 0 <= out["accuracy"] <= 1
    assert net.predict(X[:1]).shape == (1,)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bias_feeding_batch_norm_has_gradient_exactly_zero(dtype):
    """Batch norm with batch statistics removes a constant shift of s_l, so dJ/db_l = 0
    exactly for l < k (not rounding noise, which Adam would amplify); the last bias, biases
    before batch norm after the ReLU, and eval mode (fixed μ) keep their gradients."""
    X, y = _data()
    net = Network(12, [8, 6], dtype=dtype, seed=1, residual=True)
    net.params["b1"] += 0.5  # a non-zero bias changes nothing
    grads = net.loss(X, y, lam=0.1).grads
    for l in (1, 2):
        assert net.bias_cancelled(l) and not grads[f"b{l}"].any()
        assert grads[f"b{l}"].dtype == np.dtype(dtype)
    assert np.abs(grads["b3"]).min() > 0
    after = Network(12, [8, 6], dtype=dtype, seed=1, norm_position="after")
    assert all(np.abs(after.loss(X, y).grads[f"b{l}"]).max() > 1e-4 for l in (1, 2, 3))
    net.update_running_stats(net.loss(X, y, grads=False).batch_stats)
    net.params["b1"] += 0.5  # now off the moving mean: eval mode sees the shift
    assert np.abs(net.loss(X, y, mode="eval").grads["b1"]).max() > 1e-4


def test_float32_network_draws_float32_dropout_masks():
    net = Network(12, [8, 6], dtype="float32", seed=1, dropout=0.3)
    masks = net.dropout_masks(16, np.random.default_rng(2))
    rng = np.random.default_rng(2)
    for l, width in ((1, 8), (2, 6)):
        assert masks[l].dtype == np.float32
        np.testing.assert_array_equal(masks[l] != 0,
                                      rng.random((16, width), dtype=np.float32) >= 0.3)
    with pytest.raises(ValueError, match=r"^dropout masks must be \{1: \(16, 8\), 2: \(16, 6\)\}"):
        net.loss(*_data(), masks={1: masks[1]})


def test_scores_of_no_rows_and_evaluate_without_lambda():
    net = Network(12, [8], 5, batch_norm=False, dtype="float32")
    empty = net.scores(np.zeros((0, 12)))
    assert empty.shape == (0, 5) and empty.dtype == np.float32
    X, y = _data(classes=5)
    result = net.evaluate(X, y)
    assert result["cost"] == result["loss"]  # λ defaults to 0
    r = net.loss(X, y)
    assert r.cost == r.loss and r.grads is not None
    assert net.loss(X, y, grads=False).grads is None


def test_the_l2_gradient_term_allocates_no_weight_sized_temporary():
    """After the first step, the 2λW term of the gradient costs no extra memory: a step
    with λ > 0 peaks no higher than one with λ = 0 (a temporary 2λ·W1 would add W1's
    size, 256 KiB here, to the peak)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 512)), rng.integers(0, 10, 64)
    net = Network(512, [64, 32], 10, batch_norm=True, seed=0)
    net.loss(X, y, 0.01, mode="train")  # the first step creates the buffers

    def peak(lam):
        tracemalloc.start()
        net.loss(X, y, lam, mode="train")
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    without = peak(0.0)
    assert peak(0.01) <= without + 4096 < without + net.params["W1"].nbytes
