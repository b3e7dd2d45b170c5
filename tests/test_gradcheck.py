"""The gradient check: correct networks pass at 1e-7, planted batch-norm bugs fail it."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from klayer import gradcheck as G
from klayer import layers as L
from klayer.cli import main
from klayer.network import Network

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
    with pytest.raises(SystemExit):
        main(["gradcheck", "--hidden", "a,b"])


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
    assume(min((np.abs(s).min() for s in _relu_inputs(net, X)), default=1.0) > 1e-4)
    rows = G.check_gradients(net, X, y, LAM)
    assert all(r.passed for r in rows), G.markdown_table(rows)


def _relu_inputs(net, X):
    """The inputs of every ReLU in a train-mode forward pass."""
    seen, real = [], L.relu_forward

    def recording(x):
        seen.append(x.copy())
        return real(x)

    L.relu_forward = recording
    try:
        net.forward(X, "train")
    finally:
        L.relu_forward = real
    return seen
