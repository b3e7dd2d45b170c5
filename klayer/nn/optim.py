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
"""

from __future__ import annotations

import numpy as np

from klayer.nn.errors import UserError


def per_member(value, theta):
    """``value`` lined up with the parameter ``theta``: a number stays as it is; one value
    per population member, a (K,) array, becomes (K, 1, ..., 1) in theta's dtype."""
    if not isinstance(value, np.ndarray):  # isinstance: 20× cheaper than np.ndim
        return value
    return np.asarray(value, theta.dtype).reshape((-1,) + (1,) * (theta.ndim - 1))


class SGD:
    """Plain gradient descent: θ ← θ - η ∇θ J, in place, for every parameter θ.

    The product η ∇θ is formed in a scratch array kept per parameter, so a step
    allocates nothing and leaves ``grads`` untouched. SGD has no state to save.
    """

    name = "sgd"

    def __init__(self):
        self._scratch: dict[str, np.ndarray] = {}

    def step(self, params: dict, grads: dict, lr: float) -> None:
        """θ -= lr · g for each name in ``params`` (``grads`` has the same names and shapes)."""
        for name, theta in params.items():
            g = grads[name]
            buf = self._scratch.get(name)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype:
                buf = self._scratch[name] = np.empty_like(g)
            np.multiply(g, per_member(lr, theta), out=buf)
            theta -= buf

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

    def step(self, params: dict, grads: dict, lr: float) -> None:
        for name, theta in params.items():
            g = grads[name]
            v = self.velocity.get(name)
            if v is None:
                v = self.velocity[name] = g.copy()
                self._scratch[name] = np.empty_like(g)
            else:
                v *= per_member(self.momentum, theta)
                v += g
            np.multiply(v, per_member(lr, theta), out=self._scratch[name])
            theta -= self._scratch[name]

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
            self._scratch[name] = np.empty_like(self.velocity[name])


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

    def step(self, params: dict, grads: dict, lr: float) -> None:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        correction1, correction2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        constants = (b1, 1 - b1, b2, 1 - b2, correction2, self.eps, lr / correction1)
        lined_up = {}  # parameter rank -> the constants lined up with such a parameter
        for name, theta in params.items():
            g = grads[name]
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
