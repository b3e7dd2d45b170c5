"""Optimizers: parameter updates kept apart from the model and from the training loop.

An optimizer walks the network's named parameter mapping and its gradients,
``step(params, grads, lr)``, updating the arrays in place. Whatever it remembers between
steps (velocities, moment estimates, a step counter) goes through ``state_dict()`` /
``load_state_dict()`` as a flat mapping of names to arrays and numbers, so a checkpoint
can store it with ``np.savez`` and a resumed run continues exactly. Momentum or Adam is
one more class with these three methods and an entry in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import numpy as np


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
            np.multiply(g, lr, out=buf)
            theta -= buf

    def state_dict(self) -> dict:
        """Names -> arrays or numbers needed to continue; empty for SGD."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(
                f"SGD keeps no state, but the checkpoint has optimizer entries {sorted(state)}: "
                "it was written with another optimizer"
            )


OPTIMIZERS = {"sgd": SGD}


def make_optimizer(name: str):
    """A fresh optimizer by name (one of :data:`OPTIMIZERS`)."""
    try:
        return OPTIMIZERS[name]()
    except KeyError:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}") from None
