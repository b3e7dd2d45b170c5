"""Layer pairs: each backward against centred differences, and batch-norm properties."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from klayer import layers as L
from klayer.gradcheck import numerical_gradients


def _num_grad(f, arrays, h=1e-6):
    """Numerical gradient of the scalar f() w.r.t. each array in the dict ``arrays``."""
    return numerical_gradients(f, arrays, h)


def _rel(a, b, floor=1e-12):
    """Largest difference relative to the tensor's scale (at least ``floor``)."""
    return np.max(np.abs(a - b)) / max(floor, np.max(np.abs(a) + np.abs(b)))


def test_affine_backward_matches_numerical():
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    dout = rng.standard_normal((5, 3))
    out, cache = L.affine_forward(x, W, b)
    np.testing.assert_allclose(out, x @ W.T + b)
    dx, dW, db = L.affine_backward(dout, cache)
    num = _num_grad(lambda: np.sum(L.affine_forward(x, W, b)[0] * dout), {"x": x, "W": W, "b": b})
    for got, name in ((dx, "x"), (dW, "W"), (db, "b")):
        assert _rel(got, num[name]) < 1e-8, name
    assert L.affine_backward(dout, cache, need_dx=False)[0] is None


def test_relu_pair():
    x = np.array([[-1.0, 0.0, 2.0], [3.0, -0.5, 0.1]])
    out, cache = L.relu_forward(x)
    np.testing.assert_array_equal(out, [[0, 0, 2], [3, 0, 0.1]])
    dx = L.relu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dx, [[0, 0, 1], [1, 0, 1]])


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(1)
    scores, y = rng.standard_normal((6, 4)) * 3, np.array([0, 1, 2, 3, 0, 1])
    loss, dscores = L.softmax_cross_entropy(scores, y)
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), y])), rel=1e-12)
    num = _num_grad(lambda: L.softmax_cross_entropy(scores, y)[0], {"s": scores})["s"]
    assert _rel(dscores, num) < 1e-8
    np.testing.assert_allclose(L.softmax(scores).sum(axis=1), 1.0)


def test_softmax_is_stable_for_large_scores():
    scores = np.array([[1000.0, 0.0, -1000.0]])
    loss, d = L.softmax_cross_entropy(scores, np.array([0]))
    assert np.isfinite(loss) and np.all(np.isfinite(d))


def _bn_case(n, m, seed):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, m)) * rng.uniform(0.5, 3, m) + rng.uniform(-2, 2, m)
    gamma, beta = rng.uniform(0.5, 2, m), rng.standard_normal(m)
    return s, gamma, beta, rng.standard_normal((n, m))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), m=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_batchnorm_train_forward_normalises_each_column(n, m, seed):
    s, gamma, beta, _ = _bn_case(n, m, seed)
    eps = 1e-5
    out, _, (mean, var) = L.batchnorm_forward(s, gamma, beta, eps)
    np.testing.assert_allclose(mean, s.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(var, s.var(axis=0), rtol=1e-10, atol=1e-14)  # biased 1/n
    s_hat = (out - beta) / gamma
    np.testing.assert_allclose(s_hat.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(s_hat.var(axis=0), var / (var + eps), rtol=1e-8)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 10), m=st.integers(1, 5), seed=st.integers(0, 2**31),
       train=st.booleans())
def test_batchnorm_backward_matches_numerical(n, m, seed, train):
    s, gamma, beta, dout = _bn_case(n, m, seed)
    eps = 1e-3
    stats = {} if train else {"mean": s.mean(axis=0) + 0.1, "var": s.var(axis=0) + 0.5}
    _, cache, _ = L.batchnorm_forward(s, gamma, beta, eps, **stats)
    ds, dgamma, dbeta = L.batchnorm_backward(dout, cache)

    def f():
        return np.sum(L.batchnorm_forward(s, gamma, beta, eps, **stats)[0] * dout)

    num = _num_grad(f, {"s": s, "gamma": gamma, "beta": beta}, h=1e-6)
    # With n = 2 the normalised batch is ±1 whatever s is, and ds is only O(ε) small:
    # its scale can fall to the finite difference's noise, hence the floor.
    assert _rel(ds, num["s"], floor=1e-2) < 1e-7
    assert _rel(dgamma, num["gamma"]) < 1e-7
    assert _rel(dbeta, num["beta"]) < 1e-7
    if train:  # a constant shift of s is normalised away: ds sums to zero per column
        np.testing.assert_allclose(ds.sum(axis=0), 0, atol=1e-9 * np.abs(ds).max() + 1e-12)


def test_batchnorm_eval_mode_uses_given_statistics():
    s, gamma, beta, _ = _bn_case(4, 3, 7)
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0, 0.25])
    out, _, used = L.batchnorm_forward(s, gamma, beta, 0.0 + 1e-12, mean, var)
    np.testing.assert_allclose(out, gamma * (s - mean) / np.sqrt(var + 1e-12) + beta)
    assert used[0] is mean and used[1] is var


def test_batchnorm_train_mode_refuses_single_example():
    with pytest.raises(ValueError, match="at least 2"):
        L.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3), 1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_preserve_dtype(dtype):
    s, gamma, beta, dout = (a.astype(dtype) for a in _bn_case(8, 4, 3))
    out, cache, _ = L.batchnorm_forward(s, gamma, beta, 1e-5)
    ds, dg, db = L.batchnorm_backward(dout, cache)
    r, rc = L.relu_forward(out)
    a, ac = L.affine_forward(r, np.ones((2, 4), dtype), np.zeros(2, dtype))
    loss, dsc = L.softmax_cross_entropy(a, np.array([0, 1] * 4))
    for arr in (out, ds, dg, db, r, L.relu_backward(dout, rc), a, dsc):
        assert arr.dtype == dtype
