"""The catalogue of classic batch-norm gradient bugs, and the gradients each one gives.

Analytic bugs are mistakes in a forward/backward implementation; numerical bugs are
mistakes in the finite-difference check that is meant to catch them. Every entry has a
stable ID, the symptom it leaves, the fix, and the line of the derivation it breaks
(numbered as in docs/batchnorm-backward.md):

    (0) ∂J/∂s_k = (P - Y) / n
    (1) μ = (1/n) Σ_i s_i
    (2) v = (1/n) Σ_i (s_i - μ)²
    (3) ŝ = (s - μ) / sqrt(v + ε)
    (4) s̃ = γ ⊙ ŝ + β
    (5) x = max(0, s̃),  ∂J/∂s̃ = ∂J/∂x ⊙ [s̃ > 0]
    (6) ∂J/∂γ = Σ_i ∂J/∂s̃_i ⊙ ŝ_i,  ∂J/∂β = Σ_i ∂J/∂s̃_i
    (7) g = ∂J/∂ŝ = γ ⊙ ∂J/∂s̃
    (8) ∂J/∂s = (1/sqrt(v + ε)) ⊙ (g - mean(g) - ŝ ⊙ mean(g ⊙ ŝ))
    (9) ∂J/∂W_l = Σ_i ∂J/∂s_i x_i^T + 2λ W_l,  ∂J/∂b_l = Σ_i ∂J/∂s_i (= 0 under BN)

:func:`planted_gradients` computes the gradients of a case with one analytic bug planted.
It is the core's forward and backward pass (:mod:`klayer.nn.layers`) with the one piece
that the bug changes swapped out; with no bug it equals :class:`klayer.nn.network.Network`'s
gradients (tests hold it to 1e-12). :func:`planted_numeric` computes what a finite-difference
check with one numerical bug returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klayer.diagnose.metrics import scaled_errors
from klayer.nn import gradcheck as G
from klayer.nn import layers as L


@dataclass(frozen=True)
class Bug:
    id: str
    kind: str  # "analytic" or "numerical"
    title: str
    symptom: str
    fix: str
    breaks: str  # the line of the derivation it breaks
    explanation: str


CATALOGUE = [
    Bug("variance-not-biased", "analytic",
        "batch variance with 1/(n-1) instead of 1/n",
        "every tensor is off, the last layer too (the forward pass changed); the error "
        "shrinks like 1/n as the batch grows",
        "use the biased variance: np.var(s, axis=...) with ddof=0 (MATLAB: var(S, 1, 2), "
        "not var(S, 0, 2); torch: unbiased=False)",
        "(2) v = (1/n) Σ_i (s_i - μ)²",
        "Batch norm normalises with the biased (1/n) variance, the one the backward formula "
        "(8) is derived from. MATLAB's var and torch.var divide by n-1 by default, which "
        "changes the forward pass (so even the last layer's gradients move) and leaves ŝ "
        "without unit variance, so (8) no longer matches the forward pass either."),
    Bug("gamma-missing-in-backward", "analytic",
        "γ left out when going from ∂J/∂s̃ to ∂J/∂ŝ",
        "γ_l and β_l are right but W_l, b_l and every layer below are wrong; invisible while "
        "γ = 1 (at initialisation)",
        "multiply by γ before the batch-norm backward pass: g = γ ⊙ ∂J/∂s̃",
        "(7) g = ∂J/∂ŝ = γ ⊙ ∂J/∂s̃",
        "s̃ = γ ⊙ ŝ + β, so the gradient reaching ŝ is scaled by γ. Forgetting it gives the "
        "right ∂J/∂γ and ∂J/∂β (they are taken before the scaling) and a wrong ∂J/∂s from "
        "there down. A gradient check at initialisation (γ = 1) cannot see it."),
    Bug("mean-term-missing", "analytic",
        "the term from ∂μ/∂s dropped from ∂J/∂s",
        "γ_l and β_l are right, W_l and everything below wrong; b_l gets a non-zero "
        "gradient (it should be exactly 0)",
        "subtract the batch mean of g: ∂J/∂s = (g - mean(g) - ŝ ⊙ mean(g ⊙ ŝ)) / sqrt(v + ε)",
        "(8) ∂J/∂s = (1/sqrt(v + ε)) ⊙ (g - mean(g) - ŝ ⊙ mean(g ⊙ ŝ))",
        "μ depends on every s_i, so each s_i also moves ŝ through μ: that path contributes "
        "-mean(g). Without it ∂J/∂s no longer sums to 0 over the batch, which is why ∂J/∂b_l "
        "(exactly 0 in a correct implementation) becomes non-zero."),
    Bug("variance-term-missing", "analytic",
        "the term from ∂v/∂s dropped from ∂J/∂s",
        "γ_l and β_l are right, W_l and everything below wrong; b_l stays 0",
        "keep the variance term: - ŝ ⊙ mean(g ⊙ ŝ) inside the bracket of (8)",
        "(8) ∂J/∂s = (1/sqrt(v + ε)) ⊙ (g - mean(g) - ŝ ⊙ mean(g ⊙ ŝ))",
        "v depends on every s_i too; that path contributes -ŝ ⊙ mean(g ⊙ ŝ). "
        "Without it the gradient still sums to 0 over the batch (so b_l "
        "looks right) but W_l and everything below are wrong."),
    Bug("relu-mask-from-wrong-tensor", "analytic",
        "ReLU derivative taken from the scores before batch norm",
        "γ_l, β_l, W_l and everything below are wrong; the last layer is right",
        "take the mask from the ReLU's own input: [s̃ > 0] (or from its output x > 0), not [s > 0]",
        "(5) x = max(0, s̃),  ∂J/∂s̃ = ∂J/∂x ⊙ [s̃ > 0]",
        "With batch norm the ReLU's input is s̃ = γ ⊙ ŝ + β, not s = W x + b. Code written "
        "first without batch norm often keeps its mask [s > 0], which differs from [s̃ > 0] "
        "wherever batch norm moves a value across 0."),
    Bug("l2-factor", "analytic",
        "λ W instead of 2 λ W for the regularisation term",
        "only the W tensors are wrong (b, γ, β right); the error grows with λ and vanishes "
        "at λ = 0",
        "the derivative of λ ‖W‖² is 2 λ W",
        "(9) ∂J/∂W_l = Σ_i ∂J/∂s_i x_i^T + 2λ W_l",
        "The cost has λ Σ ‖W_l‖² (no 1/2 in front), whose derivative is 2λ W_l. Code "
        "written for the ½λ‖W‖² convention adds λ W_l."),
    Bug("loss-not-averaged", "analytic",
        "the cross-entropy gradient not divided by the batch size",
        "every tensor is n times too large (W apart from its 2λW term), with the right sign",
        "divide by n: ∂J/∂s_k = (P - Y) / n, or sum instead of average in the cost too",
        "(0) ∂J/∂s_k = (P - Y) / n",
        "The cost averages the cross-entropy over the n examples, so its gradient carries "
        "1/n. Dropping it scales every data gradient by n."),
    Bug("eps-outside-sqrt", "analytic",
        "ε added to the standard deviation instead of the variance",
        "small errors everywhere, largest for features of small variance and for a large ε",
        "normalise with 1/sqrt(v + ε), in the forward and the backward pass",
        "(3) ŝ = (s - μ) / sqrt(v + ε)",
        "(s - μ) / (sqrt(v) + ε) is a different function from (s - μ) / sqrt(v + ε); the "
        "difference is of order ε / sqrt(v), so it hides unless some feature has a small "
        "variance."),
    Bug("numeric-with-running-stats", "numerical",
        "the finite-difference cost uses fixed (moving-average) mean and variance",
        "the analytic gradient is right but disagrees with the numeric one for W of every "
        "batch-norm layer and for everything below the last one, while its γ, β and the last "
        "layer agree; b_l shows a non-zero numeric gradient",
        "evaluate the cost for the numerical gradient in training mode, with the batch "
        "statistics recomputed at every perturbation",
        "(1)-(2) μ and v are functions of s, not constants",
        "In training the normalisation uses the batch's own μ and v, and the analytic "
        "gradient (8) includes their dependence on s. A numeric check that evaluates the "
        "cost with stored statistics differentiates a different function, with ∂J/∂s = "
        "g / sqrt(v + ε)."),
    Bug("bn-bias-false-alarm", "numerical",
        "a relative error of ~1 on a bias that feeds batch norm",
        "relative error ≈ 1 on b_l of every batch-norm layer, everything else fine",
        "nothing is wrong: ∂J/∂b_l is exactly 0; compare biases feeding batch norm by "
        "absolute error (or drop b_l: batch norm's β replaces it)",
        "(9) ∂J/∂b_l = Σ_i ∂J/∂s_i = 0",
        "Batch norm subtracts the batch mean, so adding a constant to s_l changes nothing: "
        "the true ∂J/∂b_l is 0. The analytic value is ~1e-17 (rounding) and the numeric one "
        "~1e-10 (finite-difference noise), so |a - n| / (|a| + |n|) is ~1 however correct "
        "the code is."),
    Bug("step-too-large", "numerical",
        "finite-difference step h too large",
        "errors on every tensor that grow like h² (centred) or h (one-sided), smooth and "
        "systematic",
        "use centred differences with h = 1e-5 in float64 (or h = 1e-6 for one-sided)",
        "(numeric) (J(θ + h) - J(θ - h)) / 2h = J'(θ) + h² J'''(θ) / 6 + ...",
        "The centred difference has a truncation error h² J''' / 6. With h = 1e-2 or more "
        "the numeric gradient itself is off by 1e-4 relative or more, enough to fail a "
        "correct implementation."),
    Bug("float32-numeric", "numerical",
        "numeric gradient computed in float32",
        "noisy errors of 1e-3 to 1 on every tensor, with random signs",
        "compute the numerical gradient (and the cost it differences) in float64",
        "(numeric) roundoff of J is about ε_machine · abs(J) / h",
        "In float32 the cost carries a rounding error of about 6e-8 · abs(J); divided by h = 1e-5 "
        "this is ~1e-2 of noise on every numeric entry, far above any tolerance."),
]
BUGS = {b.id: b for b in CATALOGUE}
ANALYTIC = [b.id for b in CATALOGUE if b.kind == "analytic"]
NUMERICAL = [b.id for b in CATALOGUE if b.kind == "numerical"]


# --- analytic gradients with a bug planted ---------------------------------------------------


def _bn_forward(s, gamma, beta, eps, bug):
    """The core's train-mode batch norm, or the forward pass a bug changes."""
    if bug == "variance-not-biased":  # 1/(n-1): the core's formula with these statistics
        n = s.shape[0]
        mean = s.mean(axis=0)
        var = ((s - mean) ** 2).sum(axis=0) / (n - 1)
        out, (s_hat, g, inv_std, _), _ = L.batchnorm_forward(s, gamma, beta, eps, mean, var)
        return out, (s_hat, g, inv_std, True)
    if bug == "eps-outside-sqrt":
        mean = s.mean(axis=0)
        inv_std = 1.0 / (np.sqrt(((s - mean) ** 2).mean(axis=0)) + eps)
        s_hat = (s - mean) * inv_std
        return gamma * s_hat + beta, (s_hat, gamma, inv_std, True)
    out, cache, _ = L.batchnorm_forward(s, gamma, beta, eps)
    return out, cache


def _bn_backward(dout, cache, bug):
    """The core's batch-norm backward pass, or the one a bug changes."""
    s_hat, gamma, inv_std, train = cache
    if bug == "gamma-missing-in-backward":  # the core's formula with γ = 1
        return L.batchnorm_backward(dout, (s_hat, np.ones_like(gamma), inv_std, train))[0], \
            *L.batchnorm_backward(dout, cache)[1:]
    ds, dgamma, dbeta = L.batchnorm_backward(dout, cache)
    n = dout.shape[0]
    if bug == "mean-term-missing":
        ds = gamma * inv_std * (dout - s_hat * dgamma / n)
    elif bug == "variance-term-missing":
        ds = gamma * inv_std * (dout - dbeta / n)
    return ds, dgamma, dbeta


def planted_gradients(case, bug: str | None = None) -> dict:
    """The case's gradients (core convention) with analytic bug ``bug`` planted (None: none)."""
    if bug is not None and bug not in ANALYTIC:
        raise ValueError(f"unknown analytic bug {bug!r}; one of {', '.join(ANALYTIC)}")
    p, k, n = case.params, case.k, len(case.X)
    h, caches = case.X, []
    for l in range(1, k + 1):
        s, affine_cache = L.affine_forward(h, p[f"W{l}"], p[f"b{l}"])
        if l == k:
            break
        pre = s.copy()
        out, bn_cache = _bn_forward(s, p[f"gamma{l}"], p[f"beta{l}"], case.eps, bug)
        h, relu_cache = L.relu_forward(out)
        if bug == "relu-mask-from-wrong-tensor":
            relu_cache = L.relu_forward(pre)[1]  # the mask of s, before batch norm
        caches.append((affine_cache, bn_cache, relu_cache))
    _, dscores = L.softmax_cross_entropy(s, case.y)
    if bug == "loss-not-averaged":
        dscores = dscores * n
    grads = {}
    dh, grads[f"W{k}"], grads[f"b{k}"] = L.affine_backward(dscores, affine_cache)
    for l in range(k - 1, 0, -1):
        affine_cache, bn_cache, relu_cache = caches[l - 1]
        ds = L.relu_backward(dh, relu_cache)
        ds, grads[f"gamma{l}"], grads[f"beta{l}"] = _bn_backward(ds, bn_cache, bug)
        dh, grads[f"W{l}"], grads[f"b{l}"] = L.affine_backward(ds, affine_cache, need_dx=l > 1)
    factor = 1.0 if bug == "l2-factor" else 2.0
    for l in range(1, k + 1):
        grads[f"W{l}"] = grads[f"W{l}"] + factor * case.lam * p[f"W{l}"]
    return {name: grads[name] for name in case.names}


def planted_cost(case, bug: str | None, params: dict) -> float:
    """The cost as the implementation with ``bug`` computes it (bugs that change the
    forward pass: variance-not-biased, eps-outside-sqrt); for a finite-difference check."""
    k, h = case.k, case.X
    for l in range(1, k + 1):
        s, _ = L.affine_forward(h, params[f"W{l}"], params[f"b{l}"])
        if l == k:
            break
        out, _ = _bn_forward(s, params[f"gamma{l}"], params[f"beta{l}"], case.eps, bug)
        h, _ = L.relu_forward(out)
    loss, _ = L.softmax_cross_entropy(s, case.y)
    return loss + case.lam * sum(float(np.vdot(params[f"W{l}"], params[f"W{l}"]))
                                 for l in range(1, k + 1))


FORWARD_BUGS = ("variance-not-biased", "eps-outside-sqrt")


# --- numerical gradients with a checker bug planted ----------------------------------------


STEPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)  # "too large" steps tried for step-too-large
FLOAT32_STEPS = (1e-3, 1e-4, 1e-5, 1e-6)


def numeric(case, h: float = G.DEFAULT_H, dtype="float64", bug: str | None = None) -> dict:
    """Centred differences of the case's cost (of the cost with analytic ``bug``)."""
    if bug is not None:
        params = {name: np.array(case.params[name], np.float64) for name in case.names}
        return G.numerical_gradients(lambda: planted_cost(case, bug, params), params, h)
    net = case.network(dtype)
    X = case.X.astype(dtype)
    grads = G.numerical_gradients(
        lambda: net.loss(X, case.y, case.lam, grads=False, check=False).cost, net.params, h)
    return {name: g.astype(np.float64) for name, g in grads.items()}


def running_stats_gradients(case) -> dict:
    """What a finite-difference check returns when its cost normalises with fixed
    statistics (here: the batch's own μ and v at the case's parameters): the gradient of
    the eval-mode cost, which the core computes exactly."""
    net = case.network()
    fwd = net.forward(case.X, "train")
    for l, (mean, var) in fwd.batch_stats.items():
        net.buffers[f"running_mean{l}"] = mean.copy()
        net.buffers[f"running_var{l}"] = var.copy()
    net.running_initialised = True
    return net.loss(case.X, case.y, case.lam, mode="eval").grads


def planted_numeric(case, bug: str) -> list[tuple[str, dict]]:
    """Numerical gradients as a check with ``bug`` gives them: a list of (variant, grads),
    one per step size tried where the bug depends on it."""
    if bug == "numeric-with-running-stats":
        return [("", running_stats_gradients(case))]
    if bug == "step-too-large":
        return [(f"h = {h:g}", numeric(case, h)) for h in STEPS]
    if bug == "float32-numeric":
        return [(f"h = {h:g}", numeric(case, h, "float32")) for h in FLOAT32_STEPS]
    if bug == "bn-bias-false-alarm":
        return [("", numeric(case))]
    raise ValueError(f"unknown numerical bug {bug!r}; one of {', '.join(NUMERICAL)}")


# --- visibility -------------------------------------------------------------------------------


VISIBLE = 1e-3  # a planted bug must move some tensor by this much (scaled error)


def visible_bugs(case) -> list[str]:
    """The analytic bugs that can show on this case: all but l2-factor when λ = 0."""
    return [bug for bug in ANALYTIC if not (bug == "l2-factor" and case.lam == 0)]


def all_visible(case) -> bool:
    """Every analytic bug that can show (:func:`visible_bugs`) moves some gradient tensor
    by more than VISIBLE (scaled), and no two of them give the same gradients."""
    exact = case.exact_gradients()
    planted = {}
    for bug in visible_bugs(case):
        g = planted_gradients(case, bug)
        if max(scaled_errors(g, exact).values()) < VISIBLE:
            return False
        planted[bug] = g
    ids = list(planted)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if max(scaled_errors(planted[a], planted[b]).values()) < VISIBLE:
                return False
    return True
