"""Learning-rate schedules: objects mapping an update step t = 0, 1, ... to η_t.

A schedule knows nothing about the optimizer or the model; the training loop asks it
for η_t before update t and passes that to the optimizer. A new schedule (step or
cosine decay, say) is one more small class with ``__call__(step) -> float`` and an
entry in :data:`SCHEDULES`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConstantLR:
    """η_t = η for every step."""

    eta: float

    def __call__(self, step: int) -> float:
        return self.eta


@dataclass(frozen=True)
class CyclicLR:
    """The triangular cyclical learning rate (Smith 2015), one cycle = 2·n_s steps.

    With t' = t mod 2 n_s:
        η_t = η_min + (t' / n_s) (η_max - η_min)            for 0 <= t' <= n_s
        η_t = η_max - ((t' - n_s) / n_s) (η_max - η_min)    for n_s < t' < 2 n_s
    so η_0 = η_min, η_{n_s} = η_max and η_{2 n_s} = η_min again.
    """

    eta_min: float
    eta_max: float
    n_s: int

    def __call__(self, step: int) -> float:
        t = step % (2 * self.n_s)
        if t > self.n_s:
            t = 2 * self.n_s - t  # the falling half mirrors the rising one
        return self.eta_min + (t / self.n_s) * (self.eta_max - self.eta_min)


SCHEDULES = ("cyclic", "constant")


def make_schedule(config):
    """The schedule a :class:`klayer.config.TrainConfig` asks for.

    "cyclic": :class:`CyclicLR` (eta_min, eta_max, n_s); "constant": η = eta_max.
    """
    if config.schedule == "cyclic":
        return CyclicLR(config.eta_min, config.eta_max, config.n_s)
    if config.schedule == "constant":
        return ConstantLR(config.eta_max)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
