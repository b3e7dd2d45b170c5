"""The gradient check: correct networks pass at 1e-7, planted batch-norm bugs fail it."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from klayer.nn import gradcheck as G
from klayer.nn import layers as L
from klayer.cli import main
from klayer.nn.network import Network

LAM = 0.01
# (batch_norm, hidden widths): k-layer networks have k - 1 hidden layers.
CASES = [
    (False, [15]), (False, [15, 12]), (False, [15, 12, 10]),
    (True, [15]), (True, [15, 12]), (True, [15, 12, 10, 10, 12, 10, 11, 10]),
]


def _problem(dims=16, samples=14, seed=0):
    return G.random_problem(dims, samples, seed=seed)


@pytest.mark.parametrize("batch_norm,hidden", CASES,
                         ids=[f"{len(h) + 1}layer-{'bn' if b else 'nobn'}" for b, h in CASES])
def test_every_gradient_within_1e7(batch_norm, hidden):
    X, y = _problem()
    net = Network(X.shape[1], hidden, batch_norm=batch_norm, seed=1)
    rows = G.check_gradients(net, X, y, LAM)
    assert {r.name for r in rows} == set(net.params)
    for r in rows:
        if batch_norm and r.param == "b" and r.layer < net.num_layers:
            assert r.kind == "absolute" and r.error <= 1e-8, r
        else:
            assert r.kind == "relative" and r.error <= 1e-7, r
    assert all(r.passed for r in rows)


def test_check_also_passes_with_non_trivial_gamma_and_beta():
    X, y = _problem(seed=3)
    net = Network(X.shape[1], [12, 10], batch_norm=True, seed=3)
    rng = np.random.default_rng(3)
    for l in (1, 2):
        net.params[f"gamma{l}"][:] = rng.uniform(0.5, 2.0, 12 if l == 1 else 10)
        net.params[f"beta{l}"][:] = rng.normal(0, 0.5, 12 if l == 1 else 10)
    assert all(r.passed for r in G.check_gradients(net, X, y, LAM))


# --- the check can fail: planted batch-norm bugs ------------------------------------------


def _bn_layers(net):
    return [l for l in range(1, net.num_layers) if net.has_batch_norm(l)]


def _errors(rows):
    return {r.name: r.error for r in rows}


def test_detects_variance_scaled_in_forward_only(monkeypatch):
    real_forward = L.batchnorm_forward

    def buggy_forward(s, gamma, beta, eps, mean=None, var=None):
        if mean is None:  # train mode: normalise with (n-1)/n times the batch variance
            n = s.shape[0]
            mean, var = s.mean(axis=0), s.var(axis=0) * (n - 1) / n
            out, (s_hat, g, inv_std, _), stats = real_forward(s, gamma, beta, eps, mean, var)
            return out, (s_hat, g, inv_std, True), stats  # backward believes: train mode
        return real_forward(s, gamma, beta, eps, mean, var)

    monkeypatch.setattr(L, "batchnorm_forward", buggy_forward)
    X, y = _problem(samples=10)
    net = Network(X.shape[1], [12, 10], batch_norm=True, seed=2)
    errors = _errors(G.check_gradients(net, X, y, LAM))
    for l in _bn_layers(net):
        assert errors[f"W{l}"] > 1e-3, errors


def test_detects_numerical_loss_computed_with_moving_averages():
    X, y = _problem()
    net = Network(X.shape[1], [12, 10], batch_norm=True, seed=4)
    first = net.loss(X, y, LAM)
    net.update_running_stats(first.batch_stats)
    numeric = G.numerical_gradients(
        lambda: net.loss(X, y, LAM, mode="eval", grads=False).cost, net.params)
    errors = _errors(G.compare(net, first.grads, numeric))
    for l in _bn_layers(net):
        assert errors[f"W{l}"] > 1e-3, errors


def test_detects_gamma_left_out_of_backward(monkeypatch):
    real_backward = L.batchnorm_backward

    def buggy_backward(dout, cache):
        s_hat, gamma, inv_std, train = cache
        return real_backward(dout, (s_hat, np.ones_like(gamma), inv_std, train))

    monkeypatch.setattr(L, "batchnorm_backward", buggy_backward)
    X, y = _problem()
    net = Network(X.shape[1], [12, 10], batch_norm=True, seed=5)
    rng = np.random.default_rng(5)
    for l in _bn_layers(net):
        net.params[f"gamma{l}"] *= rng.uniform(1.5, 3.0, net.params[f"gamma{l}"].shape)
    rows = G.check_gradients(net, X, y, LAM)
    errors = _errors(rows)
    for l in _bn_layers(net):
        assert errors[f"W{l}"] > 1e-3, errors
    assert not all(r.passed for r in rows)


# --- errors, table, command line ------------------------------------------------------------


def test_relative_error_definition():
    ga, gn = np.array([1.0, 1e-12, 0.5]), np.array([1.0 + 1e-6, 0.0, 0.5])
    assert G.relative_error(ga, gn, floor=1e-2) == pytest.approx(1e-6 / (2 + 1e-6))
    assert G.relative_error(ga, gn, floor=1e-20) == pytest.approx(1.0)
    assert G.absolute_error(ga, gn) == pytest.approx(1e-6)


def test_check_refuses_float32_and_single_samples():
    X, y = _problem()
    with pytest.raises(ValueError, match="float64"):
        G.check_gradients(Network(16, [5], dtype="float32"), X, y, LAM)
    with pytest.raises(ValueError, match="at least 2"):
        G.check_gradients(Network(16, [5]), X[:1], y[:1], LAM)


def test_markdown_table_marks_bn_biases_and_failures():
    rows = [G.GradCheckRow(1, "W", 2e-3, "relative", 1e-7, 1.0),
            G.GradCheckRow(1, "b", 1e-11, "absolute", 1e-8, 0.0),
            G.GradCheckRow(2, "W", 1e-9, "relative", 1e-7, 1.0)]
    table = G.markdown_table(rows, "t")
    assert "2.00e-03 **FAIL**" in table and "1.00e-11 (abs.†)" in table
    assert table.count("\n| ") == 3  # header + 2 layers


def test_cli_prints_table_and_exits_zero(capsys):
    code = main(["gradcheck", "--hidden", "12,10", "--batch-norm", "--dims", "15",
                 "--samples", "12", "--lambda", "0.01", "--tol", "1e-7"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| layer | error W | error b | error γ | error β |" in out and "passed" in out


def test_cli_exit_status_nonzero_when_above_tolerance(capsys):
    code = main(["gradcheck", "--hidden", "8", "--no-batch-norm", "--dims", "10",
                 "--samples", "10", "--tol", "1e-30"])
    assert code == 1 and "FAILED" in capsys.readouterr().out


def test_cli_bad_arguments(capsys):
    assert main(["gradcheck", "--samples", "1"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["gradcheck", "--hidden", "a,b"]) == 2
    assert "argument --hidden" in capsys.readouterr().err


@pytest.mark.cifar
def test_cli_on_cifar_images(cifar_dir, capsys):
    code = main(["gradcheck", "--hidden", "10,10", "--dims", "20", "--samples", "15",
                 "--cifar", "--data-dir", str(cifar_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "CIFAR-10 training images" in out


@settings(max_examples=8, deadline=None)
@given(depth=st.integers(0, 4), width=st.integers(5, 12), n=st.integers(4, 12),
       batch_norm=st.booleans(), seed=st.integers(0, 1000))
def test_gradients_of_random_networks(depth, width, n, batch_norm, seed):
    """Property: any depth, width and batch size >= 2 passes the check, away from the
    ReLU kinks (where centred differences measure no derivative: a layer whose units are
    all dead for the whole batch leaves the next one exactly at 0)."""
    X, y = G.random_problem(10, n, seed=seed)
    rng = np.random.default_rng(seed)
    hidden = [int(w) for w in rng.integers(5, width + 1, depth)]
    net = Network(10, hidden, batch_norm=batch_norm, seed=seed)
    assume(G.relu_margin(net, X) > 1e-4)
    rows = G.check_gradients(net, X, y, LAM)
    assert all(r.passed for r in rows), G.markdown_table(rows)


# --- beyond the study: normalization position, layer norm, residual, dropout, smoothing ----

# Residual blocks need equal widths: 20 inputs -> 16 (no skip), 16 -> 16 and 16 -> 16
# (skips), 16 -> 12 (no skip), then 10 classes. Narrower than 30 to keep the file fast.
BEYOND_HIDDEN = [16, 16, 16, 12]
BEYOND_CASES = {
    "bn-after-relu": (True, {"norm_position": "after"}),
    "ln-before": (False, {"layer_norm": True}),
    "ln-after": (False, {"layer_norm": True, "norm_position": "after"}),
    "residual-bn": (True, {"residual": True}),
    "dropout": (True, {"dropout": 0.3}),
    "label-smoothing": (True, {"label_smoothing": 0.1}),
    "all-bn-after": (True, {"norm_position": "after", "residual": True, "dropout": 0.3,
                            "label_smoothing": 0.1}),
    "all-ln": (False, {"layer_norm": True, "residual": True, "dropout": 0.3,
                       "label_smoothing": 0.1}),
}


def _seed_away_from_kinks(X, batch_norm, options):
    """The first network seed whose ReLU inputs all stay away from the kinks on X (a
    centred difference across a kink measures no derivative)."""
    return G.seed_away_from_kinks(
        lambda seed: Network(X.shape[1], BEYOND_HIDDEN, batch_norm=batch_norm, seed=seed,
                             **options), X)


@pytest.mark.parametrize("name", list(BEYOND_CASES))
def test_gradients_of_new_options_within_1e7(name):
    batch_norm, options = BEYOND_CASES[name]
    X, y = G.random_problem(20, 20)
    seed = _seed_away_from_kinks(X, batch_norm, options)
    rows = G.check_gradients_for(BEYOND_HIDDEN, X, y, batch_norm=batch_norm, lam=LAM,
                                 seed=seed, options=options)
    net = Network(20, BEYOND_HIDDEN, batch_norm=batch_norm, seed=seed, **options)
    assert {r.name for r in rows} == set(net.params)
    if options.get("layer_norm"):
        assert {f"gamma{l}" for l in range(1, 5)} <= {r.name for r in rows}
    relative = [r for r in rows if r.kind == "relative"]
    worst = max(relative, key=lambda r: r.error)
    assert worst.error <= 1e-7, G.markdown_table(rows, name)
    assert all(r.passed for r in rows), G.markdown_table(rows, name)
    for r in rows:  # absolute error only for biases feeding batch norm directly
        cancelled = r.param == "b" and batch_norm and r.layer < net.num_layers \
            and options.get("norm_position", "before") == "before"
        assert r.kind == ("absolute" if cancelled else "relative"), r
        if r.kind == "absolute":
            assert r.error <= 1e-8, r


def test_bn_after_relu_biases_are_judged_by_relative_error():
    X, y = G.random_problem(20, 20)
    after = Network(20, BEYOND_HIDDEN, batch_norm=True, norm_position="after")
    before = Network(20, BEYOND_HIDDEN, batch_norm=True)
    for l in range(1, after.num_layers + 1):
        assert not after.bias_cancelled(l)
        assert before.bias_cancelled(l) == (l < before.num_layers)
    # b_l feeds the ReLU, not the normalization: its gradient is not zero
    grads = after.loss(X, y, LAM).grads
    for l in range(1, after.num_layers):
        assert np.abs(grads[f"b{l}"]).max() > 1e-3
    numeric = {f"b{l}": np.zeros_like(after.params[f"b{l}"]) for l in range(1, 6)}
    assert [r.kind for r in G.compare(after, grads, numeric)] == ["relative"] * 5
    assert [r.kind for r in G.compare(before, grads, numeric)] == ["absolute"] * 4 + ["relative"]


def test_dropout_check_uses_one_fixed_mask_drawn_with_seed_0():
    X, y = G.random_problem(20, 20)
    X, y = X[:, :6], y  # a small network: the check runs twice
    net = Network(6, [5, 4], dropout=0.3, seed=0)
    masks = net.dropout_masks(20, np.random.default_rng(0))
    assert all(0 < np.count_nonzero(m) < m.size for m in masks.values())
    implicit = G.check_gradients(net, X, y, LAM)
    explicit = G.check_gradients(net, X, y, LAM, masks=masks)
    assert [(r.name, r.error) for r in implicit] == [(r.name, r.error) for r in explicit]
    # the masks matter: without them the gradient differs
    with_masks = net.loss(X, y, LAM, masks=masks).grads["W2"]
    without = net.loss(X, y, LAM).grads["W2"]
    assert G.relative_error(with_masks, without) > 1e-2


def test_detects_dropout_masks_redrawn_for_every_cost_evaluation():
    """Planted bug: fresh masks on each evaluation make the cost a random function of
    the parameters; its centred differences then measure the noise, not the gradient."""
    X, y = G.random_problem(20, 20)
    net = Network(20, BEYOND_HIDDEN, dropout=0.3, seed=1)
    rng = np.random.default_rng(0)
    analytic = net.loss(X, y, LAM, masks=net.dropout_masks(20, np.random.default_rng(0))).grads

    def cost():
        return net.loss(X, y, LAM, grads=False, masks=net.dropout_masks(20, rng)).cost

    numeric = G.numerical_gradients(cost, net.params, names=["W2", "b4", "W5"])
    rows = G.compare(net, analytic, numeric)
    assert len(rows) == 3
    assert all(not r.passed and r.error > 1e-2 for r in rows), G.markdown_table(rows)


def test_residual_networks_have_skips_exactly_where_widths_match():
    net = Network(20, [30, 30, 30, 20], residual=True)
    assert [l for l in range(0, net.num_layers + 2) if net.has_skip(l)] == [2, 3]
    # layer 1 (input width = 30) and the output layer (10 -> 10) never skip
    net = Network(30, [30, 30, 10, 10], num_classes=10, residual=True)
    assert [l for l in range(1, net.num_layers + 1) if net.has_skip(l)] == [2, 4]
    assert not any(Network(20, [30, 30, 30, 20]).has_skip(l) for l in range(1, 6))


def test_residual_skip_adds_the_layer_input():
    """With W_2 = W_3 = 0 and b = 0, the residual layers 2, 3 pass x_1 through unchanged
    (x_1 >= 0 after its ReLU), while a plain network outputs zeros there."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 20))
    out = {}
    for residual in (True, False):
        net = Network(20, [30, 30, 30, 20], batch_norm=False, residual=residual, seed=2)
        p = net.params
        for l in (2, 3):
            p[f"W{l}"][:] = 0
        for l in range(1, 6):
            p[f"b{l}"][:] = rng.normal(0, 0.1, p[f"b{l}"].shape) if l in (1, 4, 5) else 0
        out[residual] = net.forward(X).scores
        x1 = np.maximum(X @ p["W1"].T + p["b1"], 0)
        x3 = x1 if residual else np.zeros_like(x1)
        x4 = np.maximum(x3 @ p["W4"].T + p["b4"], 0)
        np.testing.assert_allclose(out[residual], x4 @ p["W5"].T + p["b5"], rtol=1e-12)
    assert not np.allclose(out[True], out[False])
