"""Learning-rate schedules: objects mapping an update step t = 0, 1, ... to η_t.

A schedule knows nothing about the optimizer or the model; the training loop asks it
for η_t before update t and passes that to the optimizer. A new schedule is one more
small class with ``__call__(step) -> float`` and an entry in :data:`SCHEDULES`.
A population of networks (:mod:`klayer.nn.population`) gives each member its own schedule:
:class:`PerMember` evaluates them all and returns η_t as a vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from klayer.nn.errors import UserError


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


@dataclass(frozen=True)
class StepLR:
    """Step decay: η_t = η_max · rate^⌊t / every⌋ (the classic "divide by 10" drops)."""

    eta_max: float
    rate: float
    every: int

    def __call__(self, step: int) -> float:
        return self.eta_max * self.rate ** (step // self.every)


@dataclass(frozen=True)
class CosineLR:
    """Cosine decay (Loshchilov & Hutter 2017, one period, no restarts) over T steps:
        η_t = η_min + ½ (η_max - η_min) (1 + cos(π t / T)),
    so η_0 = η_max and η_T = η_min."""

    eta_min: float
    eta_max: float
    total: int

    def __call__(self, step: int) -> float:
        progress = min(step, self.total) / self.total
        return self.eta_min + 0.5 * (self.eta_max - self.eta_min) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmUp:
    """Linear warm-up to ``after``: η_t = after(0) · (t + 1) / steps for t < steps, then
    η_t = after(t - steps) (the decay starts once the warm-up ends)."""

    after: object
    steps: int

    def __call__(self, step: int) -> float:
        if step < self.steps:
            return self.after(0) * (step + 1) / self.steps
        return self.after(step - self.steps)


@dataclass(frozen=True)
class PerMember:
    """One schedule per population member: η_t = (η_t^1, ..., η_t^K), a (K,) vector that
    the optimizers broadcast over each member's parameters."""

    schedules: tuple

    def __call__(self, step: int) -> np.ndarray:
        return np.array([schedule(step) for schedule in self.schedules])

    def select(self, keep) -> "PerMember":
        """The schedules of members ``keep`` (indices), in that order."""
        return PerMember(tuple(self.schedules[i] for i in keep))


SCHEDULES = ("cyclic", "constant", "step", "cosine")


def make_schedule(config):
    """The schedule a :class:`klayer.config.TrainConfig` asks for.

    "cyclic": :class:`CyclicLR` (eta_min, eta_max, n_s); "constant": η = eta_max;
    "step": :class:`StepLR` (eta_max, decay_rate, decay_every, default n_s);
    "cosine": :class:`CosineLR` from eta_max down to eta_min over the training steps.
    ``warmup_steps`` > 0 puts a linear :class:`WarmUp` before any but "cyclic" (which
    already starts low).
    """
    warmup = config.warmup_steps
    if config.schedule == "cyclic":  # the config refuses a warm-up here
        return CyclicLR(config.eta_min, config.eta_max, config.n_s)
    if config.schedule == "constant":
        schedule = ConstantLR(config.eta_max)
    elif config.schedule == "step":
        schedule = StepLR(config.eta_max, config.decay_rate, config.decay_every or config.n_s)
    elif config.schedule == "cosine":
        schedule = CosineLR(config.eta_min, config.eta_max, config.total_steps - warmup)
    else:
        raise UserError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    return WarmUp(schedule, warmup) if warmup else schedule
