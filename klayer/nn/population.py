"""A population: K networks of one architecture whose arrays carry a leading member axis.

Every parameter is stacked along the member axis, W_l: (K, m_l, m_{l-1}), b_l: (K, m_l),
and the members see the same mini-batches, so one forward pass serves all of them: the
first layer is one (n, d)·(d, K·m_1) product of the shared batch, later layers are
products batched over K. :class:`Population` is a :class:`klayer.nn.network.Network`
whose arrays carry that axis: its forward and backward passes are the Network's own,
through the same layer functions; only what is per member differs here: λ, the label
smoothing ε, the dropout p, the cost and the evaluation (one number per member), and
building from and splitting into K member networks (:meth:`Population.members`).

The learning rate (a (K,) vector η), the optimizer's constants (μ, β1, β2, ε as (K,)
vectors) and the schedule (:class:`klayer.nn.schedules.PerMember`) are per member too, so
member k's trajectory is the one it would follow trained alone on the same mini-batches,
up to rounding. :func:`klayer.train.train_population` trains a population.
"""

from __future__ import annotations

import numpy as np

from klayer.nn import layers as L
from klayer.nn.network import LossResult, Network
from klayer.nn.errors import UserError

# Network options each member may set for itself; all others must agree.
MEMBER_OPTIONS = ("init", "seed", "dropout", "label_smoothing")


class Population(Network):
    """K networks of one architecture with stacked parameters (see the module docstring).

    Built from K member networks (``Population(nets)``), or from per-member options with
    :meth:`build`. ``dropout`` and ``label_smoothing`` are (K,) vectors; ``loss`` and
    ``evaluate`` take λ as a number or a (K,) vector and return one value per member.
    """

    def __init__(self, members):
        members = list(members)
        if not members:
            raise UserError("a population needs at least one member network")
        hp = [net.hyperparameters() for net in members]
        for k, other in enumerate(hp[1:], 1):
            for name, value in hp[0].items():
                if name not in MEMBER_OPTIONS and other[name] != value:
                    raise UserError(f"population members must share {name}: member 0 has "
                                    f"{value!r}, member {k} has {other[name]!r}")
        initialised = {net.running_initialised for net in members}
        if len(initialised) > 1:
            raise UserError("population members must all have batch-norm moving averages "
                            "or none")
        super().__init__(**{**hp[0], "dropout": 0.0, "label_smoothing": 0.0})
        self.member_hyperparameters = hp
        self.dropout = np.array([h["dropout"] for h in hp])
        self.label_smoothing = np.array([h["label_smoothing"] for h in hp])
        self.params = {name: np.stack([net.params[name] for net in members])
                       for name in members[0].params}
        self.buffers = {name: np.stack([net.buffers[name] for net in members])
                        for name in members[0].buffers}
        self.running_initialised = initialised.pop()

    @classmethod
    def build(cls, size: int, input_size: int, hidden_sizes, num_classes: int = 10,
              **options) -> "Population":
        """``size`` members from Network options; each option is one value for all or a
        list of ``size`` values (one per member), e.g. ``seed=[0, 1, 2]``."""
        per_member = []
        for k in range(size):
            member = {}
            for name, value in options.items():
                if isinstance(value, (list, tuple, np.ndarray)):
                    if len(value) != size:
                        raise UserError(f"{name} has {len(value)} values for {size} members")
                    value = value[k]
                member[name] = value
            per_member.append(Network(input_size, hidden_sizes, num_classes, **member))
        return cls(per_member)

    @property
    def size(self) -> int:
        """K, the number of members."""
        return len(self.member_hyperparameters)

    def hyperparameters(self) -> list[dict]:
        """Each member's :meth:`Network.hyperparameters`."""
        return [dict(hp) for hp in self.member_hyperparameters]

    def members(self) -> list[Network]:
        """The K member networks, each with copies of its slice of every array."""
        nets = []
        for k, hp in enumerate(self.member_hyperparameters):
            net = Network.from_hyperparameters(hp)
            net.params = {name: p[k].copy() for name, p in self.params.items()}
            net.buffers = {name: b[k].copy() for name, b in self.buffers.items()}
            net.running_initialised = self.running_initialised
            nets.append(net)
        return nets

    def select(self, keep) -> "Population":
        """A new population of members ``keep`` (indices), in that order."""
        members = self.members()
        return Population(members[k] for k in keep)

    # --- per-member cost ------------------------------------------------------------

    def dropout_masks(self, n: int, rngs) -> dict:
        """Masks {l: (K, n, m_l)}: member k's drawn from ``rngs[k]`` exactly as its own
        :meth:`Network.dropout_masks` would (ones for a member with p = 0, which draws
        nothing). Empty when no member uses dropout."""
        if not self.dropout.any():
            return {}
        # Layer by layer, member by member: each member's generator still draws its
        # layers in order, and the members' generators are independent.
        return {l: np.stack([L.dropout_mask((n, self.sizes[l]), p, rng, self.dtype) if p
                             else np.ones((n, self.sizes[l]), self.dtype)
                             for p, rng in zip(self.dropout, rngs)])
                for l in range(1, self.num_layers)}

    def l2_penalty(self) -> np.ndarray:
        """Σ_l ||W_l||² of each member: (K,)."""
        return sum(np.einsum("kij,kij->k", W, W) for W in self.weights())

    def loss(self, X, y, lam=0.0, mode: str = "train", grads: bool = True,
             check: bool = True, masks=None, l2_gradient: bool = True) -> LossResult:
        """:meth:`Network.loss` per member: X (n, d) shared, λ a number or (K,); loss
        and cost (K,), gradients stacked (K, ...); ``l2_gradient`` as there."""
        lam = self._per_member_lam(lam)
        fwd, loss, dscores = self._forward_loss(X, y, mode, check, masks)
        cost = loss + lam * self.l2_penalty()
        gradients = None
        if grads:
            gradients = self.backward(dscores, fwd)
            if l2_gradient:
                self.add_l2_gradient(gradients, self.l2_term(lam)[0])
        return LossResult(loss, cost, gradients, fwd.batch_stats)

    def evaluate(self, X, y, lam=0.0, chunk: int = 10000) -> dict:
        """Loss, cost and accuracy of each member, (K,) arrays, in eval mode."""
        lam = self._per_member_lam(lam)
        y = self._checked_labels(y, len(X))
        scores = self.scores(X, "eval", chunk)
        loss, _ = L.softmax_cross_entropy(scores, y, self.label_smoothing)
        return {"loss": loss, "cost": loss + lam * self.l2_penalty(),
                "accuracy": np.mean(scores.argmax(axis=-1) == y, axis=-1)}

    def _per_member_lam(self, lam) -> np.ndarray:
        lam = np.broadcast_to(np.asarray(lam, np.float64), (self.size,))
        if not np.all(np.isfinite(lam) & (lam >= 0)):
            raise UserError(f"lam (λ) must be finite numbers >= 0, got {lam}")
        return lam

    def _check_masks(self, masks, n):
        want = {l: (self.size, n, self.sizes[l]) for l in range(1, self.num_layers)}
        got = {l: np.shape(m) for l, m in masks.items()}
        if got != want:
            raise UserError(f"dropout masks must be {want} for this population and batch "
                            f"(use dropout_masks), got {got}")


def select_optimizer(optimizer, keep):
    """The optimizer of a population restricted to members ``keep`` (indices): its
    per-member constants and its state arrays (K, ...) sliced along the member axis."""
    def take(value):
        return np.asarray(value)[keep] if np.ndim(value) else value

    kept = type(optimizer)(**{k: take(v) for k, v in optimizer.hyperparameters().items()})
    kept.load_state_dict({k: take(v) for k, v in optimizer.state_dict().items()})
    return kept
