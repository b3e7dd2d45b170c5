"""Layer pairs: each backward against centred differences, and batch-norm properties."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from klayer.nn import layers as L
from klayer.nn.gradcheck import numerical_gradients

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


def _num_grad(f, arrays, h=1e-6, order=2):
    """Numerical gradient of the scalar f() w.r.t. each array in the dict ``arrays``."""
    return numerical_gradients(f, arrays, h, order=order)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_in_place_writes_the_plain_result_over_dout(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 5)).astype(dtype)
    dout = rng.standard_normal((2, 7, 5)).astype(dtype)
    want_dx = dout * (x > 0)
    _, cache = L.relu_forward(x)
    dx = L.relu_backward(dout, cache, inplace=True)
    assert dx is dout and dx.dtype == dtype
    np.testing.assert_array_equal(dx, want_dx)


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


def test_softmax_values_row_by_row_at_any_scale():
    """softmax against exp(s) / Σ exp(s) row by row, with rows a thousand apart: each row
    is shifted by its own maximum (a shared shift would underflow the low rows to 0/0,
    a sign error would overflow the high ones); population input (K, n, C) likewise."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((4, 5))
    offsets = np.array([[-1000.0], [0.0], [3.0], [1000.0]])
    expected = np.exp(base) / np.exp(base).sum(axis=1, keepdims=True)
    got = L.softmax(base + offsets)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    stacked = np.stack([base + offsets, base - offsets])  # (K = 2, n = 4, C = 5)
    np.testing.assert_allclose(L.softmax(stacked), np.stack([expected, expected]), rtol=1e-12)


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

    num = _num_grad(f, {"s": s, "gamma": gamma, "beta": beta}, h=1e-5, order=4)
    # With n = 2 the normalised batch is ±1 whatever s is, and ds is only O(ε) small:
    # its scale can fall to the finite difference's noise, hence the floor. h = 1e-6 with
    # second-order differences let roundoff reach 1.02e-7 (n=2, m=3, seed 66982); h = 1e-5
    # with fourth-order ones keeps both roundoff and truncation far below the tolerance.
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


# --- layer normalization --------------------------------------------------------------


def _ln_case(n, m, seed):
    """Rows with their own offsets and scales, so that normalising each row matters."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, m)) * rng.uniform(0.5, 3, (n, 1)) + rng.uniform(-2, 2, (n, 1))
    gamma, beta = rng.uniform(0.5, 2, m), rng.standard_normal(m)
    return s, gamma, beta, rng.standard_normal((n, m))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 10), m=st.integers(2, 12), seed=st.integers(0, 2**31))
def test_layernorm_forward_normalises_each_row(n, m, seed):
    s, gamma, beta, _ = _ln_case(n, m, seed)
    s_before = s.copy()
    eps = 1e-5
    out, _ = L.layernorm_forward(s, gamma, beta, eps)
    np.testing.assert_array_equal(s, s_before)  # the input is not normalised in place
    s_hat = (out - beta) / gamma
    var = s.var(axis=1)  # biased, per row
    np.testing.assert_allclose(s_hat.mean(axis=1), 0, atol=1e-9)
    np.testing.assert_allclose(s_hat.var(axis=1), var / (var + eps), rtol=1e-8)
    # ≈ 1: short of it only by ε / (v + ε) <= ε / v
    assert np.all(np.abs(s_hat.var(axis=1) - 1) <= eps / var + 1e-9)
    # row by row: the same as normalising that row alone (no batch statistics)
    for i in range(n):
        alone, _ = L.layernorm_forward(s[i:i + 1], gamma, beta, eps)
        np.testing.assert_allclose(alone[0], out[i], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n,m,seed", [(1, 5, 0), (7, 4, 1), (16, 30, 2), (3, 2, 3)])
def test_layernorm_backward_matches_torch_autograd(require_torch, n, m, seed):
    s, gamma, beta, dout = _ln_case(n, m, seed)
    eps = 1e-3
    out, cache = L.layernorm_forward(s, gamma, beta, eps)
    ds, dgamma, dbeta = L.layernorm_backward(dout, cache)
    ts, tg, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True)
                  for a in (s, gamma, beta))
    tout = F.layer_norm(ts, (m,), tg, tb, eps=eps)
    tout.backward(torch.tensor(dout))
    for name, ours, theirs in (("out", out, tout.detach()), ("ds", ds, ts.grad),
                               ("dgamma", dgamma, tg.grad), ("dbeta", dbeta, tb.grad)):
        theirs = theirs.numpy()
        assert ours.shape == theirs.shape, name
        scale = max(np.abs(theirs).max(), 1e-30)
        assert np.abs(ours - theirs).max() / scale <= 1e-10, (name, np.abs(ours - theirs).max())
    # a shift common to all features of a row is normalised away: ds sums to 0 per row
    np.testing.assert_allclose(ds.sum(axis=1), 0, atol=1e-10 * np.abs(ds).max())


def test_layernorm_backward_matches_numerical():
    s, gamma, beta, dout = _ln_case(5, 6, 9)
    eps = 1e-3
    ds, dgamma, dbeta = L.layernorm_backward(dout, L.layernorm_forward(s, gamma, beta, eps)[1])
    num = _num_grad(lambda: np.sum(L.layernorm_forward(s, gamma, beta, eps)[0] * dout),
                    {"s": s, "gamma": gamma, "beta": beta})
    assert _rel(ds, num["s"]) < 1e-7
    assert _rel(dgamma, num["gamma"]) < 1e-7
    assert _rel(dbeta, num["beta"]) < 1e-7


# --- inverted dropout -----------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_mask_values_and_rate(p, dtype):
    mask = L.dropout_mask((400, 500), p, np.random.default_rng(0), dtype)
    assert mask.shape == (400, 500) and mask.dtype == np.dtype(dtype)
    scale = np.asarray(1 / (1 - p), dtype)
    assert np.all((mask == 0) | (mask == scale))
    zero_fraction = np.mean(mask == 0)
    # 200,000 Bernoulli(p) draws: standard deviation of the fraction <= 0.0012
    assert abs(zero_fraction - p) < 0.006, zero_fraction
    assert np.mean(mask) == pytest.approx(1.0, abs=0.03)  # inverted: expectation kept


def test_dropout_mask_p0_seed_and_errors():
    np.testing.assert_array_equal(L.dropout_mask((30, 7), 0.0, np.random.default_rng(1)),
                                  np.ones((30, 7)))
    a = L.dropout_mask((50, 20), 0.4, np.random.default_rng(123))
    b = L.dropout_mask((50, 20), 0.4, np.random.default_rng(123))
    c = L.dropout_mask((50, 20), 0.4, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for p in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout probability"):
            L.dropout_mask((3, 3), p, np.random.default_rng(0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_mask_draws_uniforms_of_its_own_dtype(dtype):
    """A float32 mask comes from float32 uniforms (half the random bits of float64's, a
    different stream): the documented draw, so that runs replay exactly."""
    expected = np.random.default_rng(5).random((40, 30), dtype=np.dtype(dtype)) >= 0.3
    mask = L.dropout_mask((40, 30), 0.3, np.random.default_rng(5), dtype)
    np.testing.assert_array_equal(mask != 0, expected)


def test_batchnorm_train_mode_refuses_one_example_by_name():
    with pytest.raises(ValueError, match=r"^batch norm in train mode needs a batch of at least "
                                         r"2 examples \(got 1\); use eval mode"):
        L.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3), 1e-5)


def test_dropout_forward_backward_multiply_by_mask():
    rng = np.random.default_rng(2)
    x, dout = rng.standard_normal((8, 6)), rng.standard_normal((8, 6))
    mask = L.dropout_mask(x.shape, 0.5, rng)
    assert 0 < np.count_nonzero(mask) < mask.size
    out, cache = L.dropout_forward(x, mask)
    np.testing.assert_array_equal(out, x * mask)
    np.testing.assert_array_equal(out[mask == 0], 0)
    np.testing.assert_array_equal(out[mask != 0], 2 * x[mask != 0])
    dx = L.dropout_backward(dout, cache)
    np.testing.assert_array_equal(dx, dout * mask)
    num = _num_grad(lambda: np.sum(L.dropout_forward(x, mask)[0] * dout), {"x": x})["x"]
    assert _rel(dx, num) < 1e-8


# --- label smoothing --------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.05, 0.1, 0.4, 0.9])
@pytest.mark.parametrize("n,C,scale,seed", [(6, 4, 3.0, 0), (20, 10, 1.0, 1), (5, 3, 40.0, 2)])
def test_label_smoothing_matches_torch_cross_entropy(require_torch, smoothing, n, C, scale,
                                                     seed):
    rng = np.random.default_rng(seed)
    scores, y = rng.standard_normal((n, C)) * scale, rng.integers(0, C, n)
    loss, dscores = L.softmax_cross_entropy(scores, y, smoothing)
    ts = torch.tensor(scores, requires_grad=True)
    tloss = F.cross_entropy(ts, torch.tensor(y), label_smoothing=smoothing)
    tloss.backward()
    assert isinstance(loss, float)
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    theirs = ts.grad.numpy()
    assert np.abs(dscores - theirs).max() <= 1e-12 * np.abs(theirs).max()
    np.testing.assert_allclose(dscores.sum(axis=1), 0, atol=1e-15)  # P and T both sum to 1
    unsmoothed, _ = L.softmax_cross_entropy(scores, y)
    assert loss != unsmoothed


def test_label_smoothing_zero_is_the_plain_loss():
    rng = np.random.default_rng(4)
    scores, y = rng.standard_normal((9, 5)) * 2, rng.integers(0, 5, 9)
    loss, d = L.softmax_cross_entropy(scores, y)
    loss0, d0 = L.softmax_cross_entropy(scores, y, smoothing=0.0)
    assert loss0 == loss
    np.testing.assert_array_equal(d0, d)
    # a tiny smoothing moves the loss a little, continuously
    loss_eps, d_eps = L.softmax_cross_entropy(scores, y, smoothing=1e-9)
    assert loss_eps != loss and loss_eps == pytest.approx(loss, rel=1e-7)
    np.testing.assert_allclose(d_eps, d, atol=1e-9)


def test_label_smoothing_gradient_matches_numerical_and_is_stable():
    rng = np.random.default_rng(5)
    scores, y = rng.standard_normal((7, 4)) * 3, rng.integers(0, 4, 7)
    _, d = L.softmax_cross_entropy(scores, y, 0.2)
    num = _num_grad(lambda: L.softmax_cross_entropy(scores, y, 0.2)[0], {"s": scores})["s"]
    assert _rel(d, num) < 1e-8
    loss, d = L.softmax_cross_entropy(np.array([[1000.0, 0.0, -1000.0]]), np.array([0]), 0.1)
    # -Σ t log p with t = (0.9 + 0.1/3, 0.1/3, 0.1/3): log p = (0, -1000, -2000)
    assert loss == pytest.approx(0.1 / 3 * 3000, rel=1e-12)
    assert np.all(np.isfinite(d))


# --- a leading population axis K --------------------------------------------------------


@pytest.mark.parametrize("shared_x", [True, False], ids=["shared x", "per-member x"])
def test_affine_pair_with_population_axis_is_each_members_pair(shared_x):
    rng = np.random.default_rng(11)
    K, n, d, m = 3, 6, 5, 4
    x = rng.standard_normal((n, d) if shared_x else (K, n, d))
    W, b, dout = rng.standard_normal((K, m, d)), rng.standard_normal((K, m)), \
        rng.standard_normal((K, n, m))
    out, cache = L.affine_forward(x, W, b)
    dx, dW, db = L.affine_backward(dout, cache)
    assert out.shape == (K, n, m) and dW.shape == W.shape and db.shape == b.shape
    assert L.affine_backward(dout, cache, need_dx=False)[0] is None
    for k in range(K):
        xk = x if shared_x else x[k]
        out_k, cache_k = L.affine_forward(xk, W[k], b[k])
        np.testing.assert_allclose(out[k], out_k, rtol=1e-14, atol=1e-14)
        for got, want in zip((dx[k], dW[k], db[k]), L.affine_backward(dout[k], cache_k)):
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layer", ["batch norm train", "batch norm eval", "layer norm"])
def test_norm_pairs_with_population_axis_are_each_members_pair(layer):
    rng = np.random.default_rng(12)
    K, n, m = 3, 7, 5
    s, dout = rng.standard_normal((K, n, m)) * 2 + 1, rng.standard_normal((K, n, m))
    gamma, beta = rng.standard_normal((K, m)), rng.standard_normal((K, m))
    mean, var = rng.standard_normal((K, m)), rng.random((K, m)) + 0.5

    def pair(k=slice(None)):
        if layer == "layer norm":
            out, cache = L.layernorm_forward(s[k], gamma[k], beta[k], 1e-5)
            return out, L.layernorm_backward(dout[k], cache), None
        given = (None, None) if layer == "batch norm train" else (mean[k], var[k])
        out, cache, stats = L.batchnorm_forward(s[k], gamma[k], beta[k], 1e-5, *given)
        return out, L.batchnorm_backward(dout[k], cache), stats

    out, grads, stats = pair()
    assert out.shape == (K, n, m) and [g.shape for g in grads] == [(K, n, m), (K, m), (K, m)]
    for k in range(K):
        out_k, grads_k, stats_k = pair(k)
        np.testing.assert_allclose(out[k], out_k, rtol=1e-13, atol=1e-13)
        for got, want in zip(grads, grads_k):
            np.testing.assert_allclose(got[k], want, rtol=1e-13, atol=1e-13)
        if layer == "batch norm train":  # statistics over the n axis of each member
            np.testing.assert_allclose(stats[0][k], s[k].mean(axis=0), rtol=1e-13)
            np.testing.assert_allclose(stats[1][k], s[k].var(axis=0), rtol=1e-13)


def _assert_each_member_alone(scores, targets, rtol):
    """Cross-entropy over a population axis, scores (K, n, C), with per-member, shared and
    no label smoothing, equals each member's computed alone."""
    K, n, C = scores.shape
    for smoothing in (np.array([0.0, 0.1, 0.3]), 0.2, 0.0):
        loss, d = L.softmax_cross_entropy(scores, targets, smoothing)
        assert loss.shape == (K,) and d.shape == (K, n, C)
        for k in range(K):
            eps_k = float(np.broadcast_to(smoothing, (K,))[k])
            loss_k, d_k = L.softmax_cross_entropy(scores[k], targets, eps_k)
            assert loss[k] == pytest.approx(loss_k, rel=rtol)
            np.testing.assert_allclose(d[k], d_k, rtol=rtol, atol=1e-16)


def test_cross_entropy_with_population_axis_and_per_member_smoothing():
    rng = np.random.default_rng(13)
    K, n, C = 3, 6, 4
    scores, y = rng.standard_normal((K, n, C)) * 3, rng.integers(0, C, n)
    _assert_each_member_alone(scores, y, rtol=1e-14)
    np.testing.assert_allclose(L.softmax(scores)[1], L.softmax(scores[1]), rtol=1e-15)


# --- soft targets (MixUp, CutMix) -------------------------------------------------------


def _mixed_problem(seed=21, n=7, C=5):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, C)) * 2
    y_a, y_b = rng.integers(0, C, n), rng.integers(0, C, n)
    y_b[0] = y_a[0]  # a row mixed with an image of its own class
    return scores, y_a, y_b, rng.uniform(0, 1, n)


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_cross_entropy_with_soft_targets_value_and_gradient(smoothing):
    from klayer.levers.augment import soft_targets

    scores, y_a, y_b, lam = _mixed_problem()
    n, C = scores.shape
    T = soft_targets(y_a, y_b, lam, C)
    loss, d = L.softmax_cross_entropy(scores, T, smoothing)
    T_eps = (1 - smoothing) * T + smoothing / C
    log_p = np.log(L.softmax(scores.copy()))
    assert loss == pytest.approx(-(T_eps * log_p).sum() / n, rel=1e-13)
    np.testing.assert_allclose(d, (L.softmax(scores.copy()) - T_eps) / n, rtol=1e-12,
                               atol=1e-15)
    num = _num_grad(lambda: L.softmax_cross_entropy(scores, T, smoothing)[0], {"s": scores})
    assert _rel(d, num["s"]) < 1e-8
    # the (y_a, y_b, λ) form gives the same without building T
    loss_t, d_t = L.softmax_cross_entropy(scores, (y_a, y_b, lam), smoothing)
    assert loss_t == pytest.approx(loss, rel=1e-13)
    np.testing.assert_allclose(d_t, d, rtol=1e-12, atol=1e-15)


def test_soft_targets_reduce_to_labels():
    scores, y_a, y_b, _ = _mixed_problem(seed=3)
    C = scores.shape[1]
    for smoothing in (0.0, 0.1):
        want = L.softmax_cross_entropy(scores, y_a, smoothing)
        for targets in (np.eye(C)[y_a], (y_a, y_b, 1.0), (y_b, y_a, np.zeros(len(y_a)))):
            got = L.softmax_cross_entropy(scores, targets, smoothing)
            assert got[0] == pytest.approx(want[0], rel=1e-13)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-16)
    # a target that is not one-hot: the loss rises above the hard one of its argmax
    half = L.softmax_cross_entropy(scores, (y_a, y_b, 0.5))[0]
    assert half != pytest.approx(L.softmax_cross_entropy(scores, y_a)[0])


def test_soft_targets_with_population_axis_and_per_member_smoothing():
    rng = np.random.default_rng(5)
    K, n, C = 3, 6, 4
    scores = rng.standard_normal((K, n, C)) * 3
    y_a, y_b, lam = rng.integers(0, C, n), rng.integers(0, C, n), rng.uniform(size=n)
    for targets in ((y_a, y_b, lam), np.eye(C)[y_a] * lam[:, None] + np.eye(C)[y_b]
                    * (1 - lam[:, None])):
        _assert_each_member_alone(scores, targets, rtol=1e-13)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_network_gradients_with_mixed_targets(smoothing):
    """Through Network.loss (batch norm, dropout masks, L2): analytic against numerical."""
    from klayer.nn.gradcheck import compare, numerical_gradients
    from klayer.nn.network import Network

    rng = np.random.default_rng(8)
    n, d, C = 12, 6, 4
    X = rng.standard_normal((n, d))
    y_a, y_b, lam = rng.integers(0, C, n), rng.integers(0, C, n), rng.beta(0.4, 0.4, n)
    net = Network(d, (7, 5), C, batch_norm=True, dtype="float64", seed=2, dropout=0.2,
                  label_smoothing=smoothing)
    masks = net.dropout_masks(n, np.random.default_rng(0))
    targets = (y_a, y_b, lam)
    analytic = net.loss(X, targets, 1e-3, mode="train", check=False, masks=masks).grads

    def cost():
        return net.loss(X, targets, 1e-3, mode="train", grads=False, check=False,
                        masks=masks).cost

    rows = compare(net, analytic, numerical_gradients(cost, net.params, 1e-5))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
