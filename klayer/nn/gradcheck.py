"""Gradient verification: analytic gradients against centred differences.

The numerical gradient of parameter entry θ_i is (J(θ_i + h) - J(θ_i - h)) / 2h, with
J the cost in train mode (batch statistics, as in training) and h = 1e-5, in float64.
The error of one parameter tensor is the largest entry-wise relative error

    max_i |ga_i - gn_i| / max(floor, |ga_i| + |gn_i|).

The floor is 1e-2, not a tiny number, for a measured reason: in float64 with h = 1e-5
the centred difference itself carries an absolute error of about 1e-10 (roundoff of the
cost, ≈ ε_machine·|J| / h, taken over thousands of entries). With a tiny floor, entries
whose true gradient is ~1e-4 show relative errors of 1e-6 on a correct implementation
and the check measures the finite difference, not the code. With floor 1e-2, an entry
smaller than 1e-2 must agree to 1e-9 in absolute terms (tol × floor), still 10× above
that noise and 1e6× below what any real bug produces (tests plant three).

A bias that feeds a batch-norm layer has true gradient zero (the normalisation removes
any constant shift), so a relative error is meaningless there: it is judged by the
absolute error max_i |ga_i - gn_i| instead, and the table says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klayer.nn import layers as L
from klayer.nn.errors import UserError
from klayer.nn.network import Network

DEFAULT_H = 1e-5
DEFAULT_FLOOR = 1e-2
DEFAULT_TOL = 1e-7
DEFAULT_ABS_TOL = 1e-8


def numerical_gradients(cost_fn, params: dict, h: float = DEFAULT_H, names=None,
                        order: int = 2) -> dict:
    """Centred differences of ``cost_fn()`` with respect to every entry of ``params``.

    order 2: (J(θ+h) - J(θ-h)) / 2h, truncation error h² J⁽³⁾ / 6.
    order 4: (8 (J(θ+h) - J(θ-h)) - (J(θ+2h) - J(θ-2h))) / 12h, truncation error
    h⁴ J⁽⁵⁾ / 30: for costs curved enough that h² J⁽³⁾ / 6 nears the tolerance (twice
    the cost evaluations). ``params`` is perturbed in place and restored; ``cost_fn``
    must read it.
    """
    if order not in (2, 4):
        raise UserError(f"order must be 2 or 4, got {order}")
    grads = {}
    for name in names or params:
        theta = params[name]
        g = np.zeros_like(theta)
        flat, gflat = theta.reshape(-1), g.reshape(-1)  # views of theta and g
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            plus = cost_fn()
            flat[i] = old - h
            minus = cost_fn()
            if order == 2:
                gflat[i] = (plus - minus) / (2 * h)
            else:
                flat[i] = old + 2 * h
                plus2 = cost_fn()
                flat[i] = old - 2 * h
                minus2 = cost_fn()
                gflat[i] = (8 * (plus - minus) - (plus2 - minus2)) / (12 * h)
            flat[i] = old
        grads[name] = g
    return grads


def relative_error(ga, gn, floor: float = DEFAULT_FLOOR) -> float:
    """max_i |ga_i - gn_i| / max(floor, |ga_i| + |gn_i|)."""
    ga, gn = np.asarray(ga, np.float64), np.asarray(gn, np.float64)
    return float(np.max(np.abs(ga - gn) / np.maximum(floor, np.abs(ga) + np.abs(gn))))


def absolute_error(ga, gn) -> float:
    return float(np.max(np.abs(np.asarray(ga, np.float64) - np.asarray(gn, np.float64))))


@dataclass
class GradCheckRow:
    layer: int
    param: str  # "W", "b", "gamma", "beta"
    error: float
    kind: str  # "relative" or "absolute"
    tol: float
    max_abs_grad: float  # largest |analytic gradient| entry, for scale

    @property
    def passed(self) -> bool:
        return self.error <= self.tol

    @property
    def name(self) -> str:
        return f"{self.param}{self.layer}"


def _split_name(name: str) -> tuple[str, int]:
    i = len(name.rstrip("0123456789"))
    return name[:i], int(name[i:])


def compare(net: Network, analytic: dict, numeric: dict, tol=DEFAULT_TOL,
            abs_tol=DEFAULT_ABS_TOL, floor=DEFAULT_FLOOR) -> list[GradCheckRow]:
    """One row per parameter tensor; biases feeding batch norm by absolute error."""
    rows = []
    for name in numeric:
        param, layer = _split_name(name)
        ga, gn = analytic[name], numeric[name]
        if param == "b" and net.bias_cancelled(layer):
            rows.append(GradCheckRow(layer, param, absolute_error(ga, gn), "absolute",
                                     abs_tol, float(np.abs(ga).max())))
        else:
            rows.append(GradCheckRow(layer, param, relative_error(ga, gn, floor), "relative",
                                     tol, float(np.abs(ga).max())))
    return rows


def check_gradients(net: Network, X, y, lam: float, h: float = DEFAULT_H,
                    tol: float = DEFAULT_TOL, abs_tol: float = DEFAULT_ABS_TOL,
                    floor: float = DEFAULT_FLOOR, masks=None, order: int = 2
                    ) -> list[GradCheckRow]:
    """Check every parameter of ``net`` (float64) on (X, y) with batch norm in train mode.

    With dropout, one fixed set of masks is used for every cost evaluation (``masks``,
    or masks drawn from a generator seeded with 0): the cost is then a deterministic
    function of the parameters, and the check covers the dropout backward pass.
    """
    if net.dtype != np.float64:
        raise UserError("gradient checks need a float64 network (dtype='float64')")
    if net.batch_norm:
        L.check_batch_statistics(len(X))
    if masks is None and net.dropout:
        masks = net.dropout_masks(len(X), np.random.default_rng(0))
    analytic = net.loss(X, y, lam, mode="train", masks=masks).grads

    def cost():
        return net.loss(X, y, lam, mode="train", grads=False, check=False, masks=masks).cost

    numeric = numerical_gradients(cost, net.params, h, order=order)
    return compare(net, analytic, numeric, tol, abs_tol, floor)


def check_gradients_for(hidden_sizes, X, y, *, batch_norm: bool, lam: float,
                        init="he", seed: int = 0, num_classes: int = 10, options=None,
                        **check) -> list:
    """Build a float64 network for (X, y) and check it; ``check`` goes to check_gradients.

    options: further :class:`Network` keyword arguments (layer_norm, norm_position,
    residual, dropout, label_smoothing).
    """
    net = Network(X.shape[1], hidden_sizes, num_classes, batch_norm=batch_norm, init=init,
                  dtype="float64", seed=seed, **(options or {}))
    return check_gradients(net, X, y, lam, **check)


KINK_MARGIN = 2e-4


def relu_margin(net: Network, X, masks=None) -> float:
    """The smallest |input| of any ReLU in a train-mode forward pass of X (inf if none).

    A centred difference across a ReLU kink measures no derivative: moving one weight by
    h = 1e-5 moves a pre-activation by about h·|x|, so an input within ~1e-4 of 0 can
    make a correct implementation fail. This records the inputs by wrapping
    :func:`klayer.nn.layers.relu_forward` for the one forward pass.
    """
    smallest, real = [np.inf], L.relu_forward

    def recording(x):
        if x.size:
            smallest[0] = min(smallest[0], float(np.abs(x).min()))
        return real(x)

    L.relu_forward = recording
    try:
        net.forward(X, "train", masks=masks)
    finally:
        L.relu_forward = real
    return smallest[0]


def seed_away_from_kinks(build, X, margin: float = KINK_MARGIN, tries: int = 50) -> int:
    """The first seed s in 0..tries-1 whose network ``build(s)`` keeps every ReLU input
    more than ``margin`` from 0 on X (with the dropout masks check_gradients draws)."""
    for seed in range(tries):
        net = build(seed)
        masks = net.dropout_masks(len(X), np.random.default_rng(0)) or None
        if relu_margin(net, X, masks) > margin:
            return seed
    raise UserError(f"no seed in 0..{tries - 1} keeps the ReLU inputs {margin:g} away from 0 "
                    "on these inputs; use more samples or narrower layers")


def random_problem(dims: int, samples: int, num_classes: int = 10, seed: int = 0):
    """Standard-normal inputs X: (samples, dims) and random labels, for checks."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((samples, dims)), rng.integers(0, num_classes, samples)


def markdown_table(rows: list[GradCheckRow], title: str | None = None) -> str:
    """Rows as a Markdown table: one line per layer, one column per parameter kind."""
    params = [p for p in ("W", "b", "gamma", "beta") if any(r.param == p for r in rows)]
    header = {"W": "W", "b": "b", "gamma": "γ", "beta": "β"}
    by_key = {(r.layer, r.param): r for r in rows}
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| layer | " + " | ".join(f"error {header[p]}" for p in params) + " |")
    lines.append("|---|" + "---|" * len(params))
    for layer in sorted({r.layer for r in rows}):
        cells = []
        for p in params:
            r = by_key.get((layer, p))
            if r is None:
                cells.append("")
                continue
            text = f"{r.error:.2e}"
            if r.kind == "absolute":
                text += " (abs.†)"
            if not r.passed:
                text += " **FAIL**"
            cells.append(text)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if any(r.kind == "absolute" for r in rows):
        lines += ["", "† bias feeding batch norm: its true gradient is 0, so the absolute "
                      "error max |ga - gn| is shown (tolerance "
                      f"{rows[[r.kind for r in rows].index('absolute')].tol:.0e})."]
    return "\n".join(lines)
