"""The training loop: mini-batch gradient descent with a learning-rate schedule, for one
network or for a population of K trained in lockstep.

For update step t = 0 .. T-1 (T = cycles · 2 n_s):
    η_t  = schedule(t)
    J, ∇ = net.loss(X_batch, y_batch, λ, mode="train")     (batch statistics; ∇ of the
                                                             data term alone)
    θ   ← optimizer.step(θ, ∇, η_t, l2=2λ)                   (SGD: θ - η_t (∇ + 2λ W),
                                                             the L2 term in the update)
    μ_av, v_av ← α μ_av + (1-α) μ_batch, same for v          (net.update_running_stats)
Each epoch visits floor(n / batch_size) mini-batches of a fresh permutation drawn from a
seeded generator (the few examples left over are skipped that epoch). The history is
recorded in eval mode (moving averages) at ``config.eval_steps()``.
With augmentation, each mini-batch is transformed on the fly (:mod:`klayer.levers.augment`);
with dropout, each step draws fresh masks. Shuffling, augmentation and mixing draw from
generators seeded with (``data_seed``, stream), ``data_seed`` being ``seed`` unless set;
dropout from (``seed``, stream); so turning one on does not change the others' draws.
With ``precise_bn``, the final statistics are recomputed (:mod:`klayer.levers.bn_stats`)
and the results with the moving averages are kept beside them.

The levers beyond that, in the order a mini-batch meets them:

- ``whiten = "zca"``: every image is whitened once, before training, with a ZCA fitted
  on the training split and made mirror-symmetric (:mod:`klayer.levers.whiten`), and the
  augmentation then works on the whitened images. ZCA commutes with the flips exactly;
  with translations only up to the border pixels (its filters are nearly local) — the
  price of not whitening every augmented batch, which would cost a (256, 3072) ·
  (3072, 3072) product per step, more than the step of the best MLP itself.
- augmentation (flips, translations padded as ``pad_mode`` says, jitter), then MixUp /
  CutMix (``mixup``, ``cutmix``: a fifth generator stream; the loss takes the mixed
  targets (y_a, y_b, weight) directly);
- ``whiten = "pca"``: the projection onto the top ``whiten_components`` directions is
  applied to every batch after augmentation (the projected rows are not images any
  more, so it cannot come first);
- after each update, ``ema`` keeps an exponential moving average of the weights
  (:mod:`klayer.levers.ema`, in the checkpoint too).

The whitening is fitted once and kept in the run folder (whitening.npz), so a resumed
run uses the very same one; when the model is saved, it is folded into the first layer
(:meth:`klayer.levers.whiten.Whitening.fold_into`), so model.npz is a plain network on
standardised rows and evaluate, predict and export need nothing else. With ``ema``,
the final network is the averaged one (batch-norm statistics recomputed for it over
``precise_bn`` training batches, or 50), and the plain weights' results are kept
beside it in summary.json. On CIFAR-10 images, the final evaluation also records
``test_accuracy_tta``: test-time flip averaging (:mod:`klayer.levers.tta`).

Populations. :func:`train_population` trains K configs that share everything but the
options marked ``member`` in :mod:`klayer.config` (λ, η range and schedule, init, seed,
dropout, label smoothing, ...) as one :class:`klayer.nn.population.Population`: one
mini-batch stream (shuffle, augmentation, mixing and whitening run once per step for
all), each member's own dropout masks (from its own seed), its own weight average. A
member follows the trajectory it would follow trained alone with the same
``data_seed``, up to rounding. :func:`train` is the same loop with K = 1 (on a plain
:class:`klayer.nn.network.Network`). What happens when the cost or a weight becomes
non-finite is a policy: a run alone stops with a :class:`DivergenceError`; a
population drops the member (with its step and reason) and the others go on.

The loop prints nothing and touches no file itself: progress goes to callbacks, and
a :class:`klayer.runs.RunFolder` (locked while the run lasts) writes the checkpoint after
every epoch (from a thread, while the next steps run) and each member's model, history,
summary and figures at the end; :func:`finish` does the final evaluation and PreciseBN.
A checkpoint holds the random state, so a resumed run ends with the same weights, bit
for bit, as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from klayer import runs
from klayer.config import TrainConfig, check_population
from klayer.levers import augment
from klayer.levers.bn_stats import population_statistics, use_statistics
from klayer.levers.ema import EMA
from klayer.levers.tta import flip_average_accuracy
from klayer.levers.whiten import Whitening
from klayer.modelfile import restore_network, save_model
from klayer.nn.network import Network
from klayer.nn.optim import make_optimizer
from klayer.nn.population import Population, select_optimizer
from klayer.nn.schedules import PerMember, make_schedule
from klayer.nn.errors import UserError

SHUFFLE_STREAM = 1  # the shuffling generator is seeded with (data_seed, SHUFFLE_STREAM)
AUGMENT_STREAM = 2
DROPOUT_STREAM = 3  # seeded with (seed, DROPOUT_STREAM): each member's own
MIX_STREAM = 4  # MixUp and CutMix
EMA_BN_BATCHES = 50  # batches for the EMA weights' batch-norm statistics (without precise_bn)


class DivergenceError(UserError):
    """The cost or a parameter became NaN or infinite during training."""

    def __init__(self, message, step=None, eta=None, parameter=None):
        super().__init__(message, step, eta, parameter)  # all in args: survives pickling
        self.step, self.eta, self.parameter = step, eta, parameter

    def __str__(self):
        return self.args[0]


@dataclass
class TrainEvent:
    """What callbacks receive.

    kind: "step" after every update, "eval" after each history point (``record`` is the
    new history row), "epoch" after each finished (and checkpointed) epoch. In a
    population, ``eta``, ``cost`` and ``record`` are the first active member's and
    ``active`` lists the indices of the configs still training.
    """

    kind: str
    step: int  # updates done so far
    total_steps: int
    epoch: float  # step / steps per epoch
    eta: float  # η of the last update
    cost: float  # mini-batch cost of the last update (nan before the first)
    record: dict | None = None
    active: tuple = (0,)


@dataclass
class TrainResult:
    """A finished run: the trained network, its history and its final numbers.

    ``final`` has train_/val_/test_ loss, cost and accuracy of the final network (test
    only if the data has a test set); with PreciseBN, ``final`` uses the recomputed
    statistics and ``final_moving_average`` the moving averages; ``best_*`` is the
    history row with the highest validation accuracy; ``timings`` has train_seconds
    (updates), eval_seconds (history and final evaluation) and total_seconds, summed over
    resumed sessions (a population's, with ``population_size``). With ``ema``, ``final``
    is the averaged weights' and ``final_without_ema`` the plain weights'. On image data
    with a test set, ``final`` also holds ``test_accuracy_tta`` (test-time flip averaging).
    """

    config: TrainConfig
    network: Network
    history: list
    final: dict
    best_val_accuracy: float
    best_step: int
    best_epoch: float
    steps: int
    epochs: float
    timings: dict
    run_dir: object = None
    final_moving_average: dict | None = None
    final_without_ema: dict | None = None

    def summary(self) -> dict:
        """What summary.json holds."""
        from klayer.version import __version__

        return {
            "klayer_version": __version__,
            "config_hash": self.config.config_hash(),
            "final": self.final,
            **({"final_moving_average": self.final_moving_average}
               if self.final_moving_average is not None else {}),
            **({"final_without_ema": self.final_without_ema}
               if self.final_without_ema is not None else {}),
            "best_val_accuracy": self.best_val_accuracy,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "steps": self.steps,
            "epochs": self.epochs,
            "timings": self.timings,
        }


@dataclass
class Dropped:
    """A population member removed when it diverged."""

    config: TrainConfig
    step: int  # the update step whose cost (or weights) were not finite
    eta: float
    reason: str
    history: list  # the history it had recorded until then
    run_dir: object = None


@dataclass
class _Clock:
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    before: float = 0.0  # total seconds of earlier sessions of a resumed run

    def as_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "total_seconds": self.before + time.perf_counter() - self.started}


def build_network(config: TrainConfig, input_size: int, num_classes: int = 10) -> Network:
    """The untrained network a config describes."""
    return Network(input_size, config.hidden_sizes, num_classes, batch_norm=config.batch_norm,
                   init=config.init, dtype=config.dtype, seed=config.seed,
                   layer_norm=config.layer_norm, norm_position=config.norm_position,
                   residual=config.residual, dropout=config.dropout,
                   label_smoothing=config.label_smoothing)


def evaluate(net: Network, splits: dict, lam: float) -> dict:
    """``{f"{name}_loss", f"{name}_cost", f"{name}_accuracy"}`` for each (X, y) in splits,
    in eval mode (a population: one value per member)."""
    out = {}
    for name, (X, y) in splits.items():
        for key, value in net.evaluate(X, y, lam).items():
            out[f"{name}_{key}"] = value
    return out


def train(config: TrainConfig, data, run_dir=None, callbacks=(), resume: bool = False,
          restart: bool = False) -> TrainResult:
    """Train the network ``config`` describes on preloaded ``data``.

    data: anything with X_train (n, d), y_train (n,), X_val, y_val and optionally
    X_test, y_test, standardizer, class_names (a :class:`klayer.data.Dataset`).
    run_dir: folder for config, checkpoints and results (None: nothing is written).
    callbacks: functions called with a :class:`TrainEvent`; an exception raised by one
    stops training (the last checkpoint stays).
    resume: continue from run_dir's checkpoint, which must belong to the same config.
    restart: start again in a run_dir that already holds a run (its files are replaced).
    Raises :class:`DivergenceError` when the cost or a parameter becomes non-finite.
    """
    [result] = train_population([config], data, callbacks, run_dir, resume, restart,
                                run_dirs=[run_dir], on_divergence="raise")
    return result


@np.errstate(over="ignore", invalid="ignore")  # overflow is the divergence guard's to report
def train_population(configs, data, callbacks=(), checkpoint_dir=None, resume: bool = False,
                     restart: bool = False, run_dirs=None, on_divergence: str = "drop",
                     train_history: bool = True) -> list:
    """Train K configs as one population on preloaded ``data`` (as :func:`train`).

    configs: TrainConfigs that share every option not marked ``member`` and their
    ``data_seed`` (:func:`klayer.config.check_population`).
    callbacks: functions called with a :class:`TrainEvent`.
    checkpoint_dir: folder of the population's checkpoint (written after every epoch);
    resume: continue from it, with the same configs; restart: replace what it holds.
    run_dirs: per config, the run folder its results are written to (None: none).
    on_divergence: "drop" a member whose cost or weights become non-finite (it is
    returned as a :class:`Dropped`), or "raise" a :class:`DivergenceError`.
    train_history: evaluate the training split at every history point; False: at the
    last one only (the rows before hold NaN there), for runs that need only the
    validation curve, such as a search's trials (the training split is 9 times the
    validation split: most of a history point's cost).
    Returns, per config, a :class:`TrainResult` or a :class:`Dropped`.
    """
    configs = list(configs)
    check_population(configs)
    first = configs[0]
    num_classes = len(data.class_names) if getattr(data, "class_names", None) else 10
    splits = checked_splits(data, first.dtype, num_classes)
    X_train, y_train = splits["train"]
    n, d = X_train.shape
    B, total = first.batch_size, first.total_steps
    steps_per_epoch = _steps_per_epoch(n, B)
    augmentation, mixing = _augmentation(first, d), _mixing(first, d)
    emit = _broadcast([*callbacks, *runs.fault_callbacks()])

    with runs.RunFolder(checkpoint_dir, configs, resume=resume, restart=restart) as folder:
        whitening = None if first.whiten == "none" else \
            folder.whitening(partial(fit_whitening, first, X_train))
        seen = whitened_splits(splits, whitening, first.dtype)  # what the network sees
        X_rows = seen["train"][0] if first.whiten == "zca" else X_train  # batches from
        per_batch = (lambda A: whitening.transform(A, first.dtype)) \
            if first.whiten == "pca" else (lambda A: A)
        batches = Batches(X_rows, y_train, B)
        state = TrainState.start(configs, seen["train"][0].shape[1], num_classes,
                                 steps_per_epoch, on_divergence)
        state.train_history = train_history
        if resume:
            state.restore(folder.last_checkpoint())
        else:
            folder.checkpoint(state.checkpoint())
        cost = math.nan
        for step in range(state.step, total):
            t0 = time.perf_counter()
            j = step % steps_per_epoch
            if j == 0:  # a new epoch (checkpoints fall here too): one permutation
                order = state.shuffle.permutation(n)
            Xb, yb = batches(order, j)
            eta = state.schedule(step)
            if step == 0:
                state.clock.train_seconds += time.perf_counter() - t0
                _record_initial(state.net, per_batch(Xb), yb, state.lam,
                                partial(state.record, 0, seen, emit, cost))
                t0 = time.perf_counter()
            if augmentation.active:
                Xb = augmentation(Xb, state.generators["augment"])
            targets = yb
            if mixing.active:
                Xb, *mixed = mixing(Xb, yb, state.generators["mix"])
                targets = tuple(mixed)  # (y_a, y_b, weight): the loss mixes the two targets
            Xb = per_batch(Xb)
            net = state.net
            loss = net.loss(Xb, targets, state.lam, mode="train", grads=True, check=False,
                            masks=state.dropout_masks(B), l2_gradient=False)
            grads, batch_stats = loss.grads, loss.batch_stats
            bad = ~np.isfinite(np.atleast_1d(loss.cost))
            if bad.any():
                keep = state.diverged(bad, step, eta, "the mini-batch cost is not finite",
                                      folder)
                if not state.active:
                    break
                net = state.net
                grads = {name: g[keep] for name, g in grads.items()}
                batch_stats = {l: (mean[keep], var[keep])
                               for l, (mean, var) in batch_stats.items()}
                eta = eta[keep]
            # + 2λW, and the weight average moved in the same pass over each weight
            riding = state.ema.riding() if state.ema is not None else None
            state.optimizer.step(net.params, grads, eta, l2=net.l2_term(state.lam),
                                 average=riding)
            net.update_running_stats(batch_stats)
            if state.ema is not None and riding is None:
                state.ema.update(net.params)
            state.clock.train_seconds += time.perf_counter() - t0
            state.step = done = step + 1
            epoch, end_of_epoch = done / steps_per_epoch, done % steps_per_epoch == 0
            cost = float(np.atleast_1d(loss.cost)[~bad][0])
            emit(TrainEvent("step", done, total, epoch, _first(eta), cost,
                            active=tuple(state.active)))
            state.record(done, seen, emit, cost)
            if end_of_epoch or done == total:
                bad = state.non_finite()
                if bad.any():
                    state.diverged(bad, done, eta, "a parameter or moving average is not "
                                   "finite", folder)
                    if not state.active:
                        break
                folder.checkpoint(state.checkpoint())
                if end_of_epoch:
                    emit(TrainEvent("epoch", done, total, epoch, _first(eta), cost,
                                    active=tuple(state.active)))
        results = finish(state, seen, whitening=whitening, raw_splits=splits,
                         run_dirs=run_dirs)
        folder.wait()  # the last checkpoint (written during finish) is on disk
        for result in results:
            if result.run_dir is not None and not folder.finished:  # finished: as it was
                write_run(result.run_dir, result, data)
    return results


def write_run(run_dir, result, data=None) -> None:
    """Write a finished run's (or population member's) results into its run folder:
    config, model (the whitening folded in), history, summary and curves; a dropped
    member's: config, history and a summary with its reason."""
    from klayer import plots

    run_dir, c = Path(run_dir), result.config
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_config(run_dir, c.replace(out=str(run_dir)))
    runs.write_history(run_dir / runs.HISTORY_FILE, result.history)
    if isinstance(result, Dropped):
        runs.write_summary(run_dir, {"diverged": result.reason, "step": result.step})
        return
    folded = None if c.whiten == "none" else {
        "method": c.whiten, "eps": c.whiten_eps, "components": c.whiten_components}
    save_model(run_dir, result.network, getattr(data, "standardizer", None),
               getattr(data, "class_names", None), folded_whitening=folded)
    runs.write_summary(run_dir, result.summary())
    plots.plot_history(result.history, run_dir, title=run_dir.name)


def finish(state: "TrainState", splits: dict, whitening=None, raw_splits=None,
           run_dirs=None) -> list:
    """The final evaluation (test set included) of every member still training, each as
    a run of its config alone would finish; its time is added to the state's
    eval_seconds. Returns per config a :class:`TrainResult` or its :class:`Dropped`.

    ``final`` is the last history row's train and val results and the test results;
    with ``precise_bn``, the PreciseBN statistics replace the moving averages (the
    results with those are kept in ``final_moving_average``); with ``ema``, the averaged
    weights (statistics recomputed for them) replace the plain ones (kept in
    ``final_without_ema``); on CIFAR-10 images, ``test_accuracy_tta`` is added.
    splits: as the network sees them (whitened, if so); with a ``whitening``, the
    returned networks have it folded into their first layer and take ``raw_splits``' rows.
    """
    t0 = time.perf_counter()  # train and val were just evaluated: the last history row
    raw_splits = splits if raw_splits is None else raw_splits
    run_dirs = run_dirs or [None] * len(state.configs)
    results = list(state.outcome)
    for k, net, ema in state.members():
        config, history = state.configs[k], state.histories[k]
        final = {key: v for key, v in history[-1].items() if key.startswith(("train_", "val_"))}
        if "test" in splits:
            final.update(evaluate(net, {"test": splits["test"]}, config.lam))
        final, final_moving_average = with_precise_bn(net, config, splits, final)
        final_without_ema = None
        if ema is not None:
            final_without_ema = _with_tta(final, net, raw_splits, whitening)
            ema.swap_into(net, splits["train"][0], config.batch_size,
                          config.precise_bn or EMA_BN_BATCHES, config.seed)
            final = evaluate(net, splits, config.lam)
        final = _with_tta(final, net, raw_splits, whitening)
        if whitening is not None:
            net = fold_whitening(net, whitening)
        best = max(history, key=lambda row: row["val_accuracy"])
        results[k] = TrainResult(
            config=config, network=net, history=history, final=final,
            best_val_accuracy=best["val_accuracy"], best_step=best["step"],
            best_epoch=best["epoch"], steps=config.total_steps,
            epochs=config.total_steps / state.steps_per_epoch, timings={},
            final_moving_average=final_moving_average,
            final_without_ema=final_without_ema)
    state.clock.eval_seconds += time.perf_counter() - t0
    timings = state.clock.as_dict()
    if len(state.configs) > 1:
        timings["population_size"] = len(state.configs)
    for result, run_dir in zip(results, run_dirs):
        result.run_dir = run_dir
        if isinstance(result, TrainResult):
            result.timings = dict(timings)
    return results


def with_precise_bn(net, config, splits: dict, final: dict) -> tuple[dict, dict | None]:
    """With ``config.precise_bn``: recompute ``net``'s batch-norm statistics over that many
    training batches (PreciseBN) and return (the results with them, ``final`` as it was
    with the moving averages); otherwise (``final``, None)."""
    if not config.precise_bn:
        return final, None
    use_statistics(net, population_statistics(
        net, splits["train"][0], config.batch_size, config.precise_bn, seed=config.seed))
    return evaluate(net, splits, config.lam), final


def _with_tta(final: dict, net: Network, raw_splits: dict, whitening) -> dict:
    """``final`` with test_accuracy_tta added when the test rows are CIFAR-10 images."""
    if "test" not in raw_splits or raw_splits["test"][0].shape[1] != augment.Augmentation().input_size:
        return final
    X, y = raw_splits["test"]
    preprocess = None if whitening is None else partial(whitening.transform, dtype=net.dtype)
    return {**final, "test_accuracy_tta": flip_average_accuracy(net, X, y,
                                                                preprocess=preprocess)}


# --- whitening ------------------------------------------------------------------------------


def fit_whitening(config: TrainConfig, X_train) -> Whitening:
    """The whitening ``config`` asks for, fitted on the training rows (mirror-symmetric
    when they are CIFAR-10 images, so that it commutes with the flips)."""
    symmetry = None
    if X_train.shape[1] == augment.Augmentation().input_size:
        symmetry = augment.mirror(np.arange(X_train.shape[1])[None])[0]
    if config.whiten_components is not None and config.whiten_components > X_train.shape[1]:
        raise UserError(f"whiten_components ({config.whiten_components}) must not exceed the "
                        f"{X_train.shape[1]} values of a row")
    return Whitening.fit(X_train, config.whiten, config.whiten_eps, config.whiten_components,
                         symmetry=symmetry)


def whitened_splits(splits: dict, whitening, dtype) -> dict:
    """Every split whitened (the same dict without a whitening)."""
    if whitening is None:
        return splits
    return {name: (whitening.transform(X, dtype), y) for name, (X, y) in splits.items()}


def fold_whitening(net: Network, whitening: Whitening) -> Network:
    """A copy of ``net`` (trained on whitened rows) that takes the unwhitened rows: the
    whitening folded into its first layer. Everything else is shared, unchanged."""
    hp = {**net.hyperparameters(), "input_size": whitening.input_size}
    folded = Network.from_hyperparameters(hp)
    folded.params = dict(net.params)
    folded.params["W1"], folded.params["b1"] = whitening.fold_into(net.params["W1"],
                                                                   net.params["b1"])
    folded.buffers, folded.running_initialised = net.buffers, net.running_initialised
    return folded


@dataclass
class TrainState:
    """Everything the loop changes, and so everything a checkpoint holds: the network (a
    :class:`Population` when K > 1), the optimizer's state, the generators, the weight
    average, each member's history and fate, the clock and the step."""

    configs: list
    net: Network
    optimizer: object
    schedule: object  # η_t: a number, or a (K,) vector for a population
    steps_per_epoch: int
    shuffle: np.random.Generator  # one permutation per epoch
    generators: dict  # "augment" and "mix", shared by the members: their own streams
    dropout: list  # one generator per config: its dropout masks
    ema: EMA | None = None  # the weights' moving average, with ``ema`` (per member)
    histories: list = field(default_factory=list)
    outcome: list = field(default_factory=list)  # per config: None, or its Dropped
    active: list = field(default_factory=list)  # indices of the configs still training
    clock: _Clock = field(default_factory=_Clock)
    step: int = 0  # updates done
    on_divergence: str = "raise"
    eval_steps: list = field(default_factory=list)  # per config: the steps it records
    train_history: bool = True  # False: the training split at the last history point only

    @classmethod
    def start(cls, configs: list, input_size: int, num_classes: int, steps_per_epoch: int,
              on_divergence: str = "raise") -> "TrainState":
        if on_divergence not in ("raise", "drop"):
            raise UserError(f"on_divergence must be 'raise' or 'drop', got {on_divergence!r}")
        first, seed = configs[0], configs[0].stream_seed
        nets = [build_network(c, input_size, num_classes) for c in configs]
        schedules = [make_schedule(c) for c in configs]
        return cls(configs, nets[0] if len(nets) == 1 else Population(nets),
                   make_optimizer(first.optimizer),
                   schedules[0] if len(nets) == 1 else PerMember(tuple(schedules)),
                   steps_per_epoch, shuffle=np.random.default_rng([seed, SHUFFLE_STREAM]),
                   generators={"augment": np.random.default_rng([seed, AUGMENT_STREAM]),
                               "mix": np.random.default_rng([seed, MIX_STREAM])},
                   dropout=[np.random.default_rng([c.seed, DROPOUT_STREAM]) for c in configs],
                   ema=EMA(first.ema) if first.ema else None,
                   histories=[[] for _ in configs], outcome=[None] * len(configs),
                   active=list(range(len(configs))), on_divergence=on_divergence,
                   eval_steps=[set(c.eval_steps()) for c in configs])

    @property
    def stacked(self) -> bool:
        """Whether the arrays carry a member axis (a population)."""
        return isinstance(self.net, Population)

    @property
    def lam(self):
        """λ: a number, or the active members' (K,)."""
        if not self.stacked:
            return self.configs[0].lam
        return np.array([self.configs[k].lam for k in self.active])

    def dropout_masks(self, n: int):
        """This step's dropout masks (None without dropout): each member's from its own
        generator."""
        rngs = [self.dropout[k] for k in self.active]
        return self.net.dropout_masks(n, rngs if self.stacked else rngs[0]) or None

    def members(self):
        """(config index, network, weight average or None) of each active member: the
        network itself for K = 1, else copies of each member's slices."""
        if not self.stacked:
            return [(k, self.net, self.ema) for k in self.active]  # none once dropped
        return [(k, net, None if self.ema is None else self.ema.member(i))
                for i, (k, net) in enumerate(zip(self.active, self.net.members()))]

    def record(self, step: int, splits: dict, emit, cost: float) -> None:
        """Append the history row of ``step`` (train and val in eval mode) of each active
        member whose config records one there, and emit an "eval" event."""
        wanted = [i for i, k in enumerate(self.active) if step in self.eval_steps[k]]
        if not wanted:
            return
        t0 = time.perf_counter()
        eta = np.atleast_1d(self.schedule(step))
        names = ("train", "val") if self.train_history or step == self.configs[0].total_steps \
            else ("val",)
        metrics = {key: np.atleast_1d(value) for key, value in evaluate(
            self.net, {name: splits[name] for name in names}, self.lam).items()}
        if "train" not in names:  # the training split is recorded as NaN here
            metrics.update({f"train_{key}": np.full(len(self.active), np.nan)
                            for key in ("loss", "cost", "accuracy")})
        rows = []
        for i in wanted:
            row = {"step": step, "epoch": step / self.steps_per_epoch, "eta": float(eta[i])}
            row.update({key: float(values[i]) for key, values in metrics.items()})
            self.histories[self.active[i]].append(row)
            rows.append(row)
        self.clock.eval_seconds += time.perf_counter() - t0
        emit(TrainEvent("eval", step, self.configs[0].total_steps, rows[0]["epoch"],
                        rows[0]["eta"], cost, rows[0], tuple(self.active)))

    def non_finite(self) -> np.ndarray:
        """(K,) booleans: the active member has a NaN or infinite parameter or moving
        average."""
        arrays = (*self.net.params.values(), *self.net.buffers.values())
        if not self.stacked:
            arrays = [a[None] for a in arrays]
        return np.array([not all(np.isfinite(a[i]).all() for a in arrays)
                         for i in range(len(self.active))])

    def diverged(self, bad, step: int, eta, what: str, folder) -> np.ndarray:
        """The members flagged in ``bad`` diverged at ``step``: raise a DivergenceError
        (``on_divergence = "raise"``), or drop them and return the positions kept."""
        if self.on_divergence == "raise":
            raise _divergence(self.net, step, _first(eta), what, folder)
        eta = np.broadcast_to(np.asarray(eta, float), bad.shape)
        for i in np.flatnonzero(bad):
            k = self.active[i]
            reason = f"diverged at update step {step} (η = {eta[i]:.4g}): {what}"
            self.outcome[k] = Dropped(self.configs[k], step, float(eta[i]), reason,
                                      self.histories[k])
        keep = np.flatnonzero(~bad)
        self._select(keep)
        return keep

    def _select(self, keep) -> None:
        """Go on with the active members at positions ``keep`` only."""
        self.active = [self.active[i] for i in keep]
        if self.stacked and self.active and len(keep) < self.net.size:
            self.net = self.net.select(keep)
            self.optimizer = select_optimizer(self.optimizer, keep)
            self.schedule = self.schedule.select(keep)
            if self.ema is not None:
                self.ema.select(keep)

    def checkpoint(self) -> runs.Checkpoint:
        net = self.net
        return runs.Checkpoint(
            step=self.step, epoch=self.step // self.steps_per_epoch, params=net.params,
            buffers=net.buffers, running_initialised=net.running_initialised,
            optimizer_state=self.optimizer.state_dict(),
            rng_state=self.shuffle.bit_generator.state,
            rng_states={**{name: g.bit_generator.state for name, g in self.generators.items()},
                        "dropout": [g.bit_generator.state for g in self.dropout]},
            histories=self.histories,
            dropped=[None if d is None else {"step": d.step, "eta": d.eta, "reason": d.reason}
                     for d in self.outcome],
            timings=self.clock.as_dict(), config_hash=runs.configs_hash(self.configs),
            ema_state=self.ema.state_dict() if self.ema is not None else {},
        )

    def restore(self, ckpt: runs.Checkpoint) -> None:
        """Continue from ``ckpt``: members dropped, network, optimizer, generators, weight
        average, histories and clock."""
        self.histories = ckpt.histories
        for k, d in enumerate(ckpt.dropped):
            if d is not None:
                self.outcome[k] = Dropped(self.configs[k], d["step"], d["eta"], d["reason"],
                                          self.histories[k])
        self._select([k for k, d in enumerate(self.outcome) if d is None])
        restore_network(self.net, ckpt.params, ckpt.buffers, ckpt.running_initialised,
                             ckpt.source)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.shuffle.bit_generator.state = ckpt.rng_state
        for name, generator in self.generators.items():
            if name in ckpt.rng_states:
                generator.bit_generator.state = ckpt.rng_states[name]
        for generator, state in zip(self.dropout, ckpt.rng_states.get("dropout", [])):
            generator.bit_generator.state = state
        self.clock.train_seconds = ckpt.timings["train_seconds"]
        self.clock.eval_seconds = ckpt.timings["eval_seconds"]
        self.clock.before = ckpt.timings["total_seconds"]
        self.step = ckpt.step
        if self.ema is not None:
            if not ckpt.ema_state and self.step:
                raise UserError(f"{ckpt.source} holds no weight average (ema); start the run "
                                "again")
            if ckpt.ema_state:
                self.ema.load_state_dict(ckpt.ema_state)


def _first(eta) -> float:
    """η of the first active member (η itself for one network)."""
    return float(np.atleast_1d(eta)[0])


# --- helpers ------------------------------------------------------------------------------


class Batches:
    """The mini-batches of an epoch: ``batches(order, j)`` is batch j of the permutation
    ``order``, the rows order[j B:(j+1) B] of (X, y), gathered into one (B, d) buffer that
    every step reuses. Gathering the whole epoch at once instead would allocate (and so
    have the kernel zero) a copy of the training set every epoch, 553 MB for CIFAR-10's
    45,000 float32 rows, written once and read back once from memory; the batch buffer,
    1.2 MB at B = 100, is still in the cache when the first layer reads it. A batch's
    rows are valid until the next call.
    """

    def __init__(self, X, y, batch_size: int):
        self.X, self.y, self.batch_size = X, y, batch_size
        self.buffer = np.empty((batch_size, X.shape[1]), X.dtype)

    def __call__(self, order, j: int):
        rows = order[j * self.batch_size:(j + 1) * self.batch_size]
        # mode="clip" writes straight into the buffer (the default "raise" gathers into a
        # temporary first); rows come from a permutation of range(n), never out of range.
        return np.take(self.X, rows, axis=0, out=self.buffer, mode="clip"), self.y[rows]


def checked_splits(data, dtype, num_classes) -> dict:
    """{"train": (X, y), "val": (X, y)[, "test": (X, y)]} as ``dtype``, checked once."""
    splits = {}
    for name in ("train", "val", "test"):
        X, y = getattr(data, f"X_{name}", None), getattr(data, f"y_{name}", None)
        if X is None and name == "test":
            continue
        if X is None or y is None:
            raise UserError(f"data has no {name} set (X_{name}, y_{name})")
        X, y = np.asarray(X, dtype=dtype), np.asarray(y)
        if X.ndim != 2 or y.shape != (len(X),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"data: X_{name} must be (n, d) and y_{name} (n,) integer labels, "
                            f"got {X.shape} and {y.shape} {y.dtype}")
        if not np.isfinite(X).all():
            raise UserError(f"data: X_{name} contains NaN or infinite values")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise UserError(f"data: y_{name} must lie in [0, {num_classes}), "
                             f"got [{y.min()}, {y.max()}]")
        splits[name] = (X, y)
    if splits["val"][0].shape[1] != splits["train"][0].shape[1]:
        raise UserError("data: X_train and X_val have different numbers of columns")
    return splits


def _record_initial(net: Network, Xb, yb, lam, record) -> None:
    """History point 0. With batch norm there are no moving averages yet: evaluate with
    those the first update will set (this batch's statistics), then forget them again.
    ``lam``: a number, or one per member of a population."""
    if not net.batch_norm or net.running_initialised:
        record()
        return
    stats = net.loss(Xb, yb, lam, mode="train", grads=False, check=False).batch_stats
    net.update_running_stats(stats)
    try:
        record()
    finally:
        net.buffers, net.running_initialised = {}, False


def _steps_per_epoch(n: int, batch_size: int) -> int:
    if n < batch_size:
        raise UserError(f"the training set has {n} examples, fewer than one batch "
                        f"(batch_size = {batch_size}); use a larger subset or a smaller batch")
    return n // batch_size


def _augmentation(config: TrainConfig, input_size: int):
    augmentation = augment.from_config(config)
    if augmentation.active and input_size != augmentation.input_size:
        raise UserError(f"augmentation needs CIFAR-10 images ({augmentation.input_size} "
                        f"values per row), but the data has {input_size} columns; turn flip, "
                        "translate and jitter off for this data")
    return augmentation


def _mixing(config: TrainConfig, input_size: int) -> augment.Mixing:
    mixing = augment.Mixing(mixup=config.mixup, cutmix=config.cutmix)
    size = augment.Augmentation().input_size
    if mixing.active and input_size != size:
        raise UserError(f"mixup and cutmix mix CIFAR-10 images ({size} values per row), but "
                        f"the data has {input_size} columns; turn them off for this data")
    return mixing


def _broadcast(callbacks):
    """One function that passes an event to every callback."""
    def emit(event):
        for callback in callbacks:
            callback(event)

    return emit


def _non_finite(net) -> list[str]:
    """Names of the parameters, then moving averages, holding NaN or ±inf."""
    arrays = {**net.params, **net.buffers}
    return [name for name, a in arrays.items() if not np.isfinite(a).all()]


def _divergence(net, step, eta, what, folder: runs.RunFolder) -> DivergenceError:
    """A DivergenceError naming the step, η and the first non-finite parameter."""
    bad = _non_finite(net)
    if bad:
        parameter = bad[0]
        where = f"first non-finite parameter: {parameter} (all: {', '.join(bad)})"
    else:  # the parameters are still finite, but too large for the cost
        parameter = max(net.params, key=lambda k: float(np.abs(net.params[k]).max()))
        where = (f"no parameter is non-finite yet; the largest is {parameter} with "
                 f"|entry| up to {float(np.abs(net.params[parameter]).max()):.3g}")
    message = (f"training diverged at update step {step} (η = {eta:.4g}): {what}; {where}. "
               "Lower eta_max (or lam) and train again") + folder.where_to_resume()
    return DivergenceError(message, step, eta, parameter)
