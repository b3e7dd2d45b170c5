"""Optimizers: parameter updates kept apart from the model and from the training loop.

An optimizer walks the network's named parameter mapping and its gradients,
``step(params, grads, lr)``, updating the arrays in place. Whatever it remembers between
steps (velocities, moment estimates, a step counter) goes through ``state_dict()`` /
``load_state_dict()`` as a flat mapping of names to arrays and numbers, so a checkpoint
can store it with ``np.savez`` and a resumed run continues exactly. Momentum or Adam is
one more class with these three methods and an entry in :data:`OPTIMIZERS`.

Populations (:mod:`klayer.nn.population`): parameters stacked as (K, ...), the learning rate
and every constant (μ, β1, β2, ε) may be one value per member, a (K,) vector, broadcast
over each parameter's trailing axes by :func:`per_member`. ``hyperparameters()`` returns
the constants, so that a population's optimizer can be rebuilt for fewer members.

The L2 term can ride along with the update: ``step(params, grads, lr, l2=(2λ, names))``
adds 2λ θ to the gradient of each named parameter inside the update itself, instead of
:meth:`klayer.nn.network.Network.add_l2_gradient` adding it to ``grads`` beforehand. The
numbers are the same bit for bit (the same operations on every entry, in the same
order); what changes is memory traffic. A weight is updated block by block, each block
of about :data:`BLOCK` entries small enough to stay in the CPU cache while the L2 term,
the momentum and the step are applied to it, so the weight, its gradient and its velocity
are each read from memory once, and no weight-sized temporary is written.

A weight average can ride along the same way: ``step(..., average=(averages, w))``
moves each parameter's average towards the updated parameter, a ← a + w (θ - a)
(:func:`average_in`, the formula :class:`klayer.levers.ema.EMA` uses), on each block
right after the block's update, while it is still in the cache: the same numbers as
averaging after the step, with one read of every weight from memory less.
"""

from __future__ import annotations

import numpy as np

from klayer.nn.errors import UserError

BLOCK = 1 << 17  # entries per block of a fused update: 512 kB of float32, within L2 cache


def per_member(value, theta):
    """``value`` lined up with the parameter ``theta``: a number stays as it is; one value
    per population member, a (K,) array, becomes (K, 1, ..., 1) in theta's dtype."""
    if not isinstance(value, np.ndarray):  # isinstance: 20× cheaper than np.ndim
        return value
    return np.asarray(value, theta.dtype).reshape((-1,) + (1,) * (theta.ndim - 1))


def _l2_terms(l2) -> tuple:
    """``l2`` as (2λ, names): None or ``(twice_lam, names)`` -> (twice_lam or None, set)."""
    if l2 is None:
        return None, frozenset()
    twice_lam, names = l2
    return twice_lam, frozenset(names)


def _average_terms(average) -> tuple:
    """``average`` as (averages, w): None or ``(averages, w)`` -> ({} or averages, w)."""
    if average is None:
        return {}, None
    return average


def average_in(avg, theta, scratch, weight) -> None:
    """a ← a + w (θ - a), in place on ``avg``, with ``scratch`` (theta's shape) for
    θ - a: the moving average's step, shared by :class:`klayer.levers.ema.EMA` and the
    optimizers' ``average=``."""
    np.subtract(theta, avg, out=scratch)
    scratch *= weight
    avg += scratch


_WHOLE = (...,)  # one block: the whole parameter


def _blocks(theta):
    """Indices of theta block by block: runs of rows (the axis before the last) of
    about :data:`BLOCK` entries, every member's rows at once for a population (K, m, d).
    A small or 1-D parameter is one block (the index ``...``)."""
    if theta.ndim < 2 or theta.size <= BLOCK:
        return _WHOLE
    rows = theta.shape[-2]
    per_block = max(1, BLOCK * rows // theta.size)
    return [(..., slice(i, i + per_block), slice(None)) for i in range(0, rows, per_block)]


def _part(value, index):
    """A constant lined up with a parameter (a number, or per member (K, 1, ..., 1) from
    :func:`per_member`), cut to the block ``index`` when the rows are its member axis."""
    if index is ... or not isinstance(value, np.ndarray) or value.ndim < 2 \
            or value.shape[-2] == 1:
        return value
    return value[index]


def pieces(scratch: dict, name: str, theta, arrays, constants):
    """For each block of theta: (theta's block, a scratch array fitted to it, the same
    block of each of ``arrays`` (theta's shape), each of ``constants`` lined up with it).
    The scratch array is kept in ``scratch[name]`` (the shape of theta's first block,
    theta's dtype), reallocated only when those change. A parameter of one block costs
    no slicing."""
    blocks = _blocks(theta)
    shape = theta.shape if blocks is _WHOLE else theta[blocks[0]].shape
    buf = scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != theta.dtype:
        buf = scratch[name] = np.empty(shape, theta.dtype)
    if blocks is _WHOLE:
        return ((theta, buf, *arrays, *constants),)
    out = []
    for i in blocks:
        t = theta[i]
        c = buf if t.shape == buf.shape else buf[..., :t.shape[-2], :]  # the last: shorter
        out.append((t, c, *(a[i] for a in arrays), *(_part(c_, i) for c_ in constants)))
    return out


class SGD:
    """Plain gradient descent: θ ← θ - η ∇θ J, in place, for every parameter θ.

    The product η ∇θ is formed in a scratch array kept per parameter, so a step
    allocates nothing and leaves ``grads`` untouched. SGD has no state to save.
    """

    name = "sgd"

    def __init__(self):
        self._scratch: dict[str, np.ndarray] = {}

    def step(self, params: dict, grads: dict, lr: float, l2=None, average=None) -> None:
        """θ -= lr · g for each name in ``params`` (``grads`` has the same names and shapes).

        l2: None, or ``(twice_lam, names)``: for each parameter in ``names`` the gradient
        is g + 2λ θ, formed block by block as ``Network.add_l2_gradient`` forms it (the
        same rounding); ``twice_lam`` is a number or, for a population, (K, 1, 1).
        average: None, or ``(averages, w)``: each parameter's average (an array of its
        shape in ``averages``, by name) then moves to a + w (θ - a), block by block.
        """
        twice_lam, decayed = _l2_terms(l2)
        averages, w = _average_terms(average)
        for name, theta in params.items():
            decay = name in decayed
            extra = (averages[name],) if averages else ()
            for t, c, g, *a, eta, lam2 in pieces(self._scratch, name, theta,
                                                  (grads[name], *extra),
                                                  (per_member(lr, theta), twice_lam)):
                if decay:
                    np.multiply(t, lam2, out=c)  # 2λ θ
                    c += g  # g + 2λ θ
                    c *= eta
                else:
                    np.multiply(g, eta, out=c)
                t -= c
                if a:
                    average_in(a[0], t, c, w)

    def hyperparameters(self) -> dict:
        """The constructor's arguments; none for SGD."""
        return {}

    def state_dict(self) -> dict:
        """Names -> arrays or numbers needed to continue; empty for SGD."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise UserError(
                f"SGD keeps no state, but the checkpoint has optimizer entries {sorted(state)}: "
                "it was written with another optimizer"
            )


class Momentum:
    """SGD with (heavy-ball) momentum: v ← μ v + ∇θ J, θ ← θ - η v (μ = ``momentum``).

    The same update as ``torch.optim.SGD(momentum=μ)``; v starts at the first gradient.
    """

    name = "momentum"

    def __init__(self, momentum: float = 0.9):
        if not np.all((0 <= np.asarray(momentum)) & (np.asarray(momentum) < 1)):
            raise UserError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}

    def step(self, params: dict, grads: dict, lr: float, l2=None, average=None) -> None:
        """v ← μ v + g, θ -= lr · v for each name in ``params``.

        l2: None, or ``(twice_lam, names)``: g + 2λ θ for the parameters in ``names``,
        added block by block in the same pass (as :meth:`SGD.step`); average: the
        weight average moved in the same pass (as :meth:`SGD.step`).
        """
        twice_lam, decayed = _l2_terms(l2)
        averages, w = _average_terms(average)
        for name, theta in params.items():
            g = grads[name]
            decay = name in decayed
            v = self.velocity.get(name)
            first = v is None
            if first:
                v = self.velocity[name] = np.empty_like(g)
            constants = (per_member(lr, theta), per_member(self.momentum, theta), twice_lam)
            extra = (averages[name],) if averages else ()
            for t, c, gb, vb, *a, eta, mu, lam2 in pieces(self._scratch, name, theta,
                                                           (g, v, *extra), constants):
                if decay:
                    np.multiply(t, lam2, out=c)  # 2λ θ
                    c += gb  # g + 2λ θ
                    gb = c
                if first:  # v starts at the first gradient
                    vb[...] = gb
                else:
                    vb *= mu
                    vb += gb
                np.multiply(vb, eta, out=c)
                t -= c
                if a:
                    average_in(a[0], t, c, w)

    def hyperparameters(self) -> dict:
        return {"momentum": self.momentum}

    def state_dict(self) -> dict:
        return {f"velocity/{name}": v for name, v in self.velocity.items()}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind != "velocity" or not name:
                raise UserError(f"unexpected optimizer entry {key!r} for momentum: the "
                                "checkpoint was written with another optimizer")
            self.velocity[name] = np.array(value)


class Adam:
    """Adam (Kingma & Ba): with t the step count, g = ∇θ J,
    m ← β1 m + (1-β1) g,  v ← β2 v + (1-β2) g²,
    θ ← θ - η · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε), as ``torch.optim.Adam``.
    """

    name = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict, grads: dict, lr: float, l2=None, average=None) -> None:
        """One Adam step for each name in ``params``. l2: None, or ``(twice_lam, names)``:
        the gradient of the parameters in ``names`` is g + 2λ θ; average: None, or
        ``(averages, w)``: each parameter's average then moves to a + w (θ - a) (neither
        fused: Adam's update takes several passes anyway)."""
        twice_lam, decayed = _l2_terms(l2)
        averages, w = _average_terms(average)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        correction1, correction2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        constants = (b1, 1 - b1, b2, 1 - b2, correction2, self.eps, lr / correction1)
        lined_up = {}  # parameter rank -> the constants lined up with such a parameter
        for name, theta in params.items():
            g = grads[name]
            if name in decayed:
                g = g + np.multiply(theta, twice_lam)  # as Network.add_l2_gradient
            if name not in self.m:
                self.m[name], self.v[name] = np.zeros_like(g), np.zeros_like(g)
            if theta.ndim not in lined_up:
                lined_up[theta.ndim] = [per_member(c, theta) for c in constants]
            beta1, one_minus_beta1, beta2, one_minus_beta2, c2, eps, step_size = \
                lined_up[theta.ndim]
            m, v = self.m[name], self.v[name]
            m *= beta1
            m += one_minus_beta1 * g
            v *= beta2
            v += one_minus_beta2 * (g * g)
            denom = np.sqrt(v / c2)
            denom += eps
            theta -= step_size * m / denom
            if averages:
                average_in(averages[name], theta, np.empty_like(theta), w)

    def hyperparameters(self) -> dict:
        return {"beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    def state_dict(self) -> dict:
        state = {"t": self.t}
        state.update({f"m/{name}": a for name, a in self.m.items()})
        state.update({f"v/{name}": a for name, a in self.v.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        if "t" not in state:
            raise UserError("the checkpoint's optimizer state has no Adam step count 't': "
                            "it was written with another optimizer")
        self.t = int(state["t"])
        self.m, self.v = {}, {}
        for key, value in state.items():
            if key == "t":
                continue
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise UserError(f"unexpected optimizer entry {key!r} for Adam")
            getattr(self, kind)[name] = np.array(value)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam}


def make_optimizer(name: str):
    """A fresh optimizer by name (one of :data:`OPTIMIZERS`)."""
    try:
        return OPTIMIZERS[name]()
    except KeyError:
        raise UserError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}") from None
