"""Exponential moving average (EMA) of the weights, for evaluation.

After every update step t = 1, 2, ... (t counts the updates already averaged):

    θ_ema ← d_t θ_ema + (1 - d_t) θ,    d_t = min(decay, (1 + t) / (10 + t))  (warm-up)
                                         d_t = decay                            (no warm-up)

starting from θ_ema = θ at the first update. The warm-up keeps the first, poor weights
from lingering for ~1/(1 - decay) steps; without it d_t = decay throughout. Training
never sees θ_ema: it only changes what is evaluated (:meth:`EMA.averaged`).

Batch norm. The moving averages of the batch statistics in ``net.buffers`` belong to
the weights that produced them, not to θ_ema; and the statistics of averaged weights
are not the average of the statistics (the ReLUs between the layers are not linear).
Two ways to give θ_ema its statistics, both here:

- **recompute** them for θ_ema with PreciseBN (:func:`klayer.levers.bn_stats.population_statistics`:
  a few dozen training batches through the network in train mode, frozen weights):
  pass ``bn_data`` to :meth:`EMA.swap_into`. Exact for the averaged weights; costs
  those forward passes at each evaluation. This is the choice for reported numbers.
- **average** them too: :meth:`EMA.update` given ``buffers`` keeps an EMA of the
  moving averages with the same d_t; used when no ``bn_data`` is given. Free, close
  when the weights move little over the averaging horizon, not exact.

The averages are kept in the parameters' dtype, in arrays of their own updated in place;
``state_dict()`` / ``load_state_dict()`` carry them (plain arrays and one number) in a
checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from klayer.levers.bn_stats import population_statistics
from klayer.nn.errors import UserError
from klayer.nn.optim import average_in, pieces


class EMA:
    """Moving averages of a network's parameters (and, optionally, its BN buffers).

    decay: d in [0, 1), e.g. 0.999 (an average over ~1/(1-d) = 1000 steps);
    warmup: use d_t = min(d, (1+t)/(10+t)) rather than d from the start.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        if isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating)) \
                or not 0 <= decay < 1:
            raise UserError(f"EMA decay must be in [0, 1), e.g. 0.999, got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.step = 0  # updates averaged so far
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}

    def decay_at(self, t: int) -> float:
        """d_t for the update that follows t averaged ones (t >= 1)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    def update(self, params: dict, buffers: dict | None = None) -> None:
        """Average in the current ``params`` (and ``buffers``, the BN moving averages):
        θ_ema ← d_t θ_ema + (1 - d_t) θ, computed as θ_ema += (1 - d_t)(θ - θ_ema) in
        place. The first update copies them."""
        if self.step == 0:
            self.params = {k: np.array(v) for k, v in params.items()}
        else:
            _check_names("parameters", params, self.params)
            d = self.decay_at(self.step)
            self._average(self.params, params, d)
            if buffers and self.buffers:
                _check_names("buffers", buffers, self.buffers)
                self._average(self.buffers, buffers, d)
        if buffers and not self.buffers:  # the first batch statistics just arrived
            self.buffers = {k: np.array(v) for k, v in buffers.items()}
        self.step += 1

    def riding(self) -> tuple | None:
        """The next update, for an optimizer to make while it updates the weights
        (``average=`` of :meth:`klayer.nn.optim.Momentum.step`): ``(averages, 1 - d_t)``,
        the update counted as done. The same numbers as :meth:`update` after the step,
        with one pass over the weights less. None before the first update, which copies
        the weights: call :meth:`update` then. Only the parameters ride; averaged
        buffers, if any, need :meth:`update`."""
        if self.step == 0 or self.buffers:
            return None
        d = self.decay_at(self.step)
        self.step += 1
        return self.params, 1 - d

    def _average(self, averages: dict, current: dict, d: float) -> None:
        # Block by block, as the optimisers update a weight (klayer.nn.optim.pieces): the
        # three passes over a block run while it is in the cache.
        for name, avg in averages.items():
            for avg_block, scratch, current_block in pieces(self._scratch, name, avg,
                                                            (current[name],), ()):
                average_in(avg_block, current_block, scratch, 1 - d)

    # --- populations: the averages carry the member axis ----------------------------------

    def select(self, keep) -> None:
        """Keep the averages of members ``keep`` (indices along the leading axis)."""
        self.params = {k: v[keep] for k, v in self.params.items()}
        self.buffers = {k: v[keep] for k, v in self.buffers.items()}
        self._scratch = {}

    def member(self, k: int) -> "EMA":
        """Member ``k``'s average: an EMA of one network (copies of its slices)."""
        one = EMA(self.decay, self.warmup)
        one.step = self.step
        one.params = {name: v[k].copy() for name, v in self.params.items()}
        one.buffers = {name: v[k].copy() for name, v in self.buffers.items()}
        return one

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"step": t, "params/W1": ..., "buffers/running_mean1": ...}``: what a
        checkpoint needs to continue the average (decay and warm-up come from the config)."""
        state = {"step": self.step}
        state.update({f"params/{k}": v for k, v in self.params.items()})
        state.update({f"buffers/{k}": v for k, v in self.buffers.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state:
            raise UserError("the checkpoint's EMA state has no step count 'step'")
        params, buffers = {}, {}
        for key, value in state.items():
            if key == "step":
                continue
            kind, _, name = key.partition("/")
            if kind not in ("params", "buffers") or not name:
                raise UserError(f"unexpected EMA entry {key!r} in the checkpoint")
            (params if kind == "params" else buffers)[name] = np.array(value)
        step = int(state["step"])
        if step < 0 or (step > 0) != bool(params):
            raise UserError(f"the checkpoint's EMA state is inconsistent: step {step} "
                            f"with {len(params)} averaged parameters")
        self.step, self.params, self.buffers, self._scratch = step, params, buffers, {}

    # --- evaluation with the averaged weights ---------------------------------------------

    def swap_into(self, net, bn_data=None, batch_size: int = 256,
                  num_batches: int | None = 50, seed: int = 0) -> tuple:
        """Put copies of the averaged weights into ``net``; return what it held, for
        :meth:`swap_back`. With batch norm, its statistics are recomputed for the averaged
        weights from ``bn_data`` (rows of the training set: ``num_batches`` batches of
        ``batch_size``, see :func:`klayer.levers.bn_stats.population_statistics`), or, when
        ``bn_data`` is None, the averaged buffers are used."""
        if self.step == 0:
            raise UserError("the EMA has no weights yet: call update() after a training step")
        _check_names("parameters", net.params, self.params)
        previous = (net.params, net.buffers, net.running_initialised)
        net.params = {k: v.copy() for k, v in self.params.items()}
        if not net.batch_norm:
            return previous
        try:
            if bn_data is not None:
                net.buffers = population_statistics(net, bn_data, batch_size, num_batches, seed)
            elif self.buffers:
                net.buffers = {k: v.copy() for k, v in self.buffers.items()}
            else:
                raise UserError("no averaged batch-norm statistics: pass bn_data (training "
                                "rows) to recompute them, or update() with the buffers")
        except Exception:
            self.swap_back(net, previous)
            raise
        net.running_initialised = True
        return previous

    @staticmethod
    def swap_back(net, previous: tuple) -> None:
        """Give ``net`` back the parameters and buffers :meth:`swap_into` returned."""
        net.params, net.buffers, net.running_initialised = previous

    @contextmanager
    def averaged(self, net, bn_data=None, **options):
        """``with ema.averaged(net[, bn_data]):`` evaluate ``net`` with the averaged
        weights; its own weights and statistics come back afterwards, even on error."""
        previous = self.swap_into(net, bn_data, **options)
        try:
            yield net
        finally:
            self.swap_back(net, previous)


def _check_names(what: str, given: dict, averaged: dict) -> None:
    if given.keys() != averaged.keys():
        raise UserError(f"the EMA averages {what} {sorted(averaged)}, but got "
                        f"{sorted(given)}: it belongs to another network")
