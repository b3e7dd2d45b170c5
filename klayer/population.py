"""Population training: K networks of one architecture trained in lockstep.

Every parameter is stacked along a leading member axis, W_l: (K, m_l, m_{l-1}),
b_l: (K, m_l), and the members see the same mini-batches (the same shuffles and the same
augmentation: common random numbers), so one forward pass serves all of them. The first
layer is one (n, d)·(d, K·m_1) product of the shared batch; later layers are products
batched over K. :class:`Population` is a :class:`klayer.nn.network.Network` whose arrays
carry that axis: its forward and backward passes are the Network's own, through the same
layer functions; only what is per member differs here: λ, the label smoothing ε, the
dropout p, the cost and the evaluation (one number per member), and building from and
splitting into K member networks (:meth:`Population.members`).

Each member keeps its own hyper-parameters wherever the maths allows: λ, the learning
rate and its schedule (η is a (K,) vector), the initialisation (σ and seed), dropout p,
label smoothing ε, and the optimizer's constants (μ, β1, β2, ε as (K,) vectors). Members
are independent: member k's trajectory is the one it would follow trained alone on the
same mini-batches, up to rounding (tests check 1e-10 after 100 steps).

:func:`train_population` is :func:`klayer.train.train` for K configs that differ only in
per-member options. Its data order differs from K separate runs: a solo run shuffles
(and augments) with its own seed, the population with the first member's seed for every
member. Each member's dropout masks come from its own seed, as in a solo run. So a member
whose seed equals the first member's follows exactly the run ``train(config)`` would
make. A member whose cost becomes non-finite is dropped (with the step and the reason)
and the others go on as if it had never been there. With ``checkpoint_dir``, the
population's state (stacked arrays, optimizer state, every generator, histories, dropped
members) is checkpointed after every epoch and a resumed run ends bit-identical.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klayer.levers import augment
from klayer.nn import layers as L
from klayer import runs
from klayer.nn.errors import UserError
from klayer.nn.network import LossResult, Network
from klayer.nn.optim import make_optimizer
from klayer.nn.schedules import PerMember, make_schedule
from klayer.train import (
    AUGMENT_STREAM, DROPOUT_STREAM, SHUFFLE_STREAM, Batches, checked_splits,
    build_network, evaluate, finish_network,
)

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
             check: bool = True, masks=None) -> LossResult:
        """:meth:`Network.loss` per member: X (n, d) shared, λ a number or (K,); loss
        and cost (K,), gradients stacked (K, ...)."""
        lam = self._per_member_lam(lam)
        if check:
            y = self._checked_labels(y, len(X))
        if check and masks:
            self._check_masks(masks, len(X))
        fwd = self.forward(X, mode, check=check, masks=masks)
        loss, dscores = L.softmax_cross_entropy(fwd.scores, y, self.label_smoothing)
        cost = loss + lam * self.l2_penalty()
        gradients = None
        if grads:
            gradients = self.backward(dscores, fwd)
            self.add_l2_gradient(gradients, (2 * lam).astype(self.dtype)[:, None, None])
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


# --- training ---------------------------------------------------------------------------

# Options that must agree across a population (the data, the architecture, the
# mini-batch stream); every other option may differ from member to member.
SHARED_OPTIONS = ("hidden_sizes", "batch_norm", "layer_norm", "norm_position", "residual",
                  "batch_size", "total_steps", "dtype", "optimizer", "flip", "translate",
                  "jitter", "data_dir", "protocol", "n_val", "subset")


# TrainConfig options each member may set for itself (with the same total_steps); an
# option in neither list is one population training does not implement: it must keep
# its default value (see :func:`population_key`).
MEMBER_CONFIG_OPTIONS = ("lam", "eta_min", "eta_max", "schedule", "n_s", "cycles",
                         "decay_rate", "decay_every", "warmup_steps", "init", "seed",
                         "dropout", "label_smoothing", "evals_per_cycle", "precise_bn", "out")


def _unsupported(config) -> list[str]:
    """Options of ``config`` set away from their default that population training does
    not implement."""
    default = type(config)()
    return [f.name for f in dataclasses.fields(config)
            if f.name not in MEMBER_CONFIG_OPTIONS and f.name not in SHARED_OPTIONS
            and getattr(config, f.name) != getattr(default, f.name)]


def population_key(config):
    """What configs trained together must share: the shared options (the data, the
    architecture, the mini-batch stream) and every option population training does not
    implement. Configs with equal keys can be one population; None: ``config`` uses such
    an option and trains alone."""
    if _unsupported(config):
        return None
    return tuple(getattr(config, name) for name in SHARED_OPTIONS)


def group_configs(configs, max_size: int, available: int | None = None) -> list[list[int]]:
    """The indices of ``configs`` in populations: equal :func:`population_key`, in order
    of first appearance, at most ``max_size`` members and (by
    :func:`klayer.memory.estimate`: the data once, everything else per member) what fits
    in ``available`` bytes (default: the memory free now). A config that cannot be part
    of a population is a group of its own."""
    from klayer import memory

    if max_size < 1:
        raise UserError(f"max_size must be at least 1, got {max_size}")
    available = memory.available_bytes() if available is None else available
    keyed: dict = {}
    groups: list[list[int]] = []
    for i, config in enumerate(configs):
        key = population_key(config)
        if key is None:
            groups.append([i])
            continue
        parts = memory.estimate(config)
        need = sum(parts.values()) - parts["data"]
        group = keyed.get(key)
        if group is not None and len(group[0]) < max_size and \
                (available is None or group[1] + need <= available):
            group[0].append(i)
            group[1] += need
            continue
        keyed[key] = [[i], parts["data"] + need]
        groups.append(keyed[key][0])
    return groups


def check_population(configs) -> None:
    """Raise a one-line ValueError naming the first shared option on which the configs
    differ (see :data:`SHARED_OPTIONS`), or an option population training does not
    implement."""
    if not configs:
        raise UserError("a population needs at least one config")
    for k, config in enumerate(configs):
        unsupported = _unsupported(config)
        if unsupported:
            raise UserError(f"population training does not implement "
                            f"{', '.join(unsupported)} (member {k}); train that config alone")
    for name in SHARED_OPTIONS:
        first = getattr(configs[0], name)
        for k, config in enumerate(configs[1:], 1):
            if getattr(config, name) != first:
                raise UserError(f"population configs must share {name}: member 0 has "
                                f"{first!r}, member {k} has {getattr(config, name)!r}")


@dataclass
class Dropped:
    """A member removed from the population when it diverged."""

    config: object  # its TrainConfig
    step: int  # the update step whose cost was not finite
    eta: float
    reason: str
    history: list  # the history it had recorded until then


@np.errstate(over="ignore", invalid="ignore")  # non-finite costs drop members, reported
def train_population(configs, data, callbacks=(), checkpoint_dir=None,
                     resume: bool = False) -> list:
    """Train K configs as one population on preloaded ``data`` (as :func:`klayer.train.train`).

    configs: TrainConfigs differing only in per-member options (λ, η range and schedule,
    init, seed, dropout, label smoothing, evals_per_cycle, precise_bn, out).
    callbacks: functions called with ``(step, active)`` after every update, ``active``
    the indices of the members still training; an exception raised by one stops training.
    checkpoint_dir: folder for the population's checkpoint (written after every epoch:
    stacked arrays, optimizer state, every generator's state, histories, dropped members);
    resume: continue from it, with the same configs.
    Returns, per config, a :class:`klayer.train.TrainResult` (history recorded at that
    config's ``eval_steps()`` and final results made by
    :func:`klayer.train.finish_network`, as ``train`` would) or a :class:`Dropped`;
    nothing else is written (:func:`write_run` writes a result as a run folder).
    """
    configs = list(configs)
    check_population(configs)
    first = configs[0]
    num_classes = len(data.class_names) if getattr(data, "class_names", None) else 10
    splits = checked_splits(data, first.dtype, num_classes)
    X_train, y_train = splits["train"]
    n, d = X_train.shape
    B = first.batch_size
    steps_per_epoch = n // B
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {n} examples, fewer than one batch "
                        f"(batch_size = {B}); use a larger subset or a smaller batch")
    augmentation = augment.from_config(first)
    if augmentation.active and d != augmentation.input_size:
        raise UserError(f"augmentation needs CIFAR-10 images ({augmentation.input_size} "
                        f"values per row), but the data has {d} columns")
    if resume and checkpoint_dir is None:
        raise UserError("resume needs the population's checkpoint folder (checkpoint_dir)")
    if not resume and checkpoint_dir is not None \
            and (Path(checkpoint_dir) / runs.CHECKPOINT_FILE).exists():
        raise UserError(f"{checkpoint_dir} already holds a checkpoint: resume it "
                        "(resume=True) or choose another folder")
    run = _PopulationRun(configs, d, num_classes)
    start = 0
    if resume:
        start = run.restore(checkpoint_dir, d, num_classes)
    batches = Batches(X_train, y_train, B)
    lam = np.array([c.lam for c in configs])
    eval_steps = [set(c.eval_steps()) for c in configs]
    total = first.total_steps
    started = time.perf_counter()

    def record(step, eta):  # eta: each active member's η at this step
        wanted = [i for i, k in enumerate(run.active) if step in eval_steps[k]]
        if not wanted:
            return
        t0 = time.perf_counter()
        metrics = {}
        for name in ("train", "val"):
            for key, values in run.pop.evaluate(*splits[name], lam[run.active]).items():
                metrics[f"{name}_{key}"] = values
        for i in wanted:
            row = {"step": step, "epoch": step / steps_per_epoch, "eta": float(eta[i])}
            row.update({key: float(values[i]) for key, values in metrics.items()})
            run.histories[run.active[i]].append(row)
        run.eval_seconds += time.perf_counter() - t0

    for step in range(start, total):
        t0 = time.perf_counter()
        j = step % steps_per_epoch
        if j == 0:  # a new epoch: one permutation, shared by all members
            order = run.rng.permutation(n)
        Xb, yb = batches(order, j)
        eta = run.schedule(step)
        if step == 0:
            run.train_seconds += time.perf_counter() - t0
            _record_initial(run.pop, Xb, yb, lam[run.active], lambda: record(0, eta))
            t0 = time.perf_counter()
        if augmentation.active:
            Xb = augmentation(Xb, run.augment_rng)
        masks = run.pop.dropout_masks(B, [run.dropout_rngs[k] for k in run.active]) or None
        result = run.pop.loss(Xb, yb, lam[run.active], mode="train", check=False, masks=masks)
        grads, batch_stats = result.grads, result.batch_stats
        bad = ~np.isfinite(result.cost)
        if bad.any():
            keep = run.drop(bad, step, eta, "the mini-batch cost is not finite")
            if not run.active:
                break
            grads = {name: g[keep] for name, g in grads.items()}
            batch_stats = {l: (mean[keep], var[keep]) for l, (mean, var) in batch_stats.items()}
            eta = eta[keep]
        run.optimizer.step(run.pop.params, grads, eta)
        run.pop.update_running_stats(batch_stats)
        run.train_seconds += time.perf_counter() - t0
        done = step + 1
        record(done, run.schedule(done))
        if done % steps_per_epoch == 0 or done == total:  # as train's checkpoints
            bad = _non_finite_members(run.pop)
            if bad.any():
                run.drop(bad, done, eta, "a parameter or moving average is not finite")
                if not run.active:
                    break
            if checkpoint_dir is not None:
                run.save(checkpoint_dir, done, steps_per_epoch,
                         run.elapsed + time.perf_counter() - started)
        for callback in callbacks:
            callback(done, list(run.active))

    outcome = list(run.outcome)
    active, pop, histories = run.active, run.pop, run.histories
    train_seconds, eval_seconds = run.train_seconds, run.eval_seconds
    if active:
        t0 = time.perf_counter()
        test = pop.evaluate(*splits["test"], lam[active]) if "test" in splits else {}
        nets = pop.members()
        eval_seconds += time.perf_counter() - t0
        timings = {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
                   "total_seconds": run.elapsed + time.perf_counter() - started,
                   "population_size": len(configs)}
        for i, k in enumerate(active):
            outcome[k] = finish_network(  # as a run of configs[k] alone finishes
                configs[k], nets[i], histories[k],
                {f"test_{key}": float(v[i]) for key, v in test.items()}, splits,
                steps_per_epoch, timings=dict(timings))
    return outcome


class _PopulationRun:
    """What a population run carries from step to step, and its checkpoint."""

    def __init__(self, configs, input_size, num_classes):
        first = configs[0]
        self.configs = configs
        self.pop = Population(build_network(c, input_size, num_classes) for c in configs)
        self.optimizer = make_optimizer(first.optimizer)
        self.schedule = PerMember(tuple(make_schedule(c) for c in configs))
        self.rng = np.random.default_rng([first.seed, SHUFFLE_STREAM])
        self.augment_rng = np.random.default_rng([first.seed, AUGMENT_STREAM])
        self.dropout_rngs = [np.random.default_rng([c.seed, DROPOUT_STREAM]) for c in configs]
        self.histories = [[] for _ in configs]
        self.outcome: list = [None] * len(configs)  # Dropped members
        self.active = list(range(len(configs)))  # config indices of the members training
        self.train_seconds = self.eval_seconds = self.elapsed = 0.0

    def drop(self, bad, step, eta, what) -> np.ndarray:
        """Drop the active members flagged in ``bad``; return the positions kept."""
        for i in np.flatnonzero(bad):
            k = self.active[i]
            reason = f"diverged at update step {step} (η = {eta[i]:.4g}): {what}"
            self.outcome[k] = Dropped(self.configs[k], step, float(eta[i]), reason,
                                      self.histories[k])
        keep = np.flatnonzero(~bad)
        self.active = [self.active[i] for i in keep]
        if self.active:
            self.pop = self.pop.select(keep)
            self.optimizer = select_optimizer(self.optimizer, keep)
            self.schedule = self.schedule.select(keep)
        return keep

    def config_hash(self) -> str:
        return "+".join(c.config_hash() for c in self.configs)

    def save(self, folder, step, steps_per_epoch, total_seconds) -> None:
        """checkpoint.npz in ``folder`` through :func:`klayer.runs.save_checkpoint`:
        the stacked arrays of the active members, and per config its history and, once
        dropped, why."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        members = [{"history": history,
                    "dropped": None if dropped is None else
                    {"step": dropped.step, "eta": dropped.eta, "reason": dropped.reason}}
                   for history, dropped in zip(self.histories, self.outcome)]
        runs.save_checkpoint(folder, runs.Checkpoint(
            step=step, epoch=step // steps_per_epoch, params=self.pop.params,
            buffers=self.pop.buffers, running_initialised=self.pop.running_initialised,
            optimizer_state=self.optimizer.state_dict(), rng_state=self.rng.bit_generator.state,
            rng_states={"augment": self.augment_rng.bit_generator.state,
                        **{f"dropout{k}": g.bit_generator.state
                           for k, g in enumerate(self.dropout_rngs)}},
            history=members, config_hash=self.config_hash(),
            timings={"train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                     "total_seconds": total_seconds},
        ))

    def restore(self, folder, input_size, num_classes) -> int:
        """Continue from ``folder``'s checkpoint; return the steps done."""
        ckpt = runs.load_checkpoint(folder)
        if ckpt.config_hash != self.config_hash():
            raise UserError(f"the checkpoint in {folder} belongs to other configs; resume "
                            "with the configs it was started with")
        for k, member in enumerate(ckpt.history):
            self.histories[k] = member["history"]
            if member["dropped"] is not None:
                d = member["dropped"]
                self.outcome[k] = Dropped(self.configs[k], d["step"], d["eta"], d["reason"],
                                          self.histories[k])
        self.active = [k for k, o in enumerate(self.outcome) if o is None]
        self.pop = Population(build_network(self.configs[k], input_size, num_classes)
                              for k in self.active)
        self.schedule = self.schedule.select(self.active)
        K, sizes = len(self.active), self.pop.sizes
        want_buffers = {f"running_{stat}{l}": (K, sizes[l]) for l in range(1, len(sizes) - 1)
                        for stat in ("mean", "var")
                        if self.pop.batch_norm and ckpt.running_initialised}
        if {k: a.shape for k, a in ckpt.params.items()} != \
                {k: a.shape for k, a in self.pop.params.items()} \
                or {k: a.shape for k, a in ckpt.buffers.items()} != want_buffers:
            raise UserError(f"{folder}: the checkpoint's arrays do not fit these configs; "
                            "start again without resume")
        self.pop.params = {k: np.array(a) for k, a in ckpt.params.items()}
        self.pop.buffers = {k: np.array(a) for k, a in ckpt.buffers.items()}
        self.pop.running_initialised = ckpt.running_initialised
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.rng.bit_generator.state = ckpt.rng_state
        self.augment_rng.bit_generator.state = ckpt.rng_states["augment"]
        for k, g in enumerate(self.dropout_rngs):
            g.bit_generator.state = ckpt.rng_states[f"dropout{k}"]
        self.train_seconds = ckpt.timings["train_seconds"]
        self.eval_seconds = ckpt.timings["eval_seconds"]
        self.elapsed = ckpt.timings["total_seconds"]
        return ckpt.step


def _non_finite_members(pop: Population) -> np.ndarray:
    """(K,) booleans: member k has a NaN or infinite parameter or moving average."""
    arrays = (*pop.params.values(), *pop.buffers.values())
    return np.array([not all(np.isfinite(a[k]).all() for a in arrays) for k in range(pop.size)])


def _record_initial(pop: Population, Xb, yb, lam, record) -> None:
    """History point 0, as :func:`klayer.train.train` records it: with batch norm and no
    moving averages yet, evaluate with this batch's statistics, then forget them."""
    if not pop.batch_norm or pop.running_initialised:
        record()
        return
    pop.update_running_stats(pop.loss(Xb, yb, lam, grads=False, check=False).batch_stats)
    try:
        record()
    finally:
        pop.buffers, pop.running_initialised = {}, False


def write_run(run_dir, result, data=None) -> None:
    """Write a member's result as a run folder, as ``klayer train`` leaves one: config,
    model, history and summary (a dropped member: config, history and a summary with
    its reason)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_config(run_dir, result.config.replace(out=str(run_dir)))
    runs.write_history(run_dir / runs.HISTORY_FILE, result.history)
    if isinstance(result, Dropped):
        runs.write_summary(run_dir, {"diverged": result.reason, "step": result.step})
        return
    runs.save_model(run_dir, result.network, getattr(data, "standardizer", None),
                    getattr(data, "class_names", None))
    runs.write_summary(run_dir, result.summary())
