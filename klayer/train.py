"""The training loop: mini-batch gradient descent with a learning-rate schedule.

For update step t = 0 .. T-1 (T = cycles · 2 n_s):
    η_t  = schedule(t)
    J, ∇ = net.loss(X_batch, y_batch, λ, mode="train")     (batch statistics)
    θ   ← optimizer.step(θ, ∇, η_t)                          (SGD: θ - η_t ∇)
    μ_av, v_av ← α μ_av + (1-α) μ_batch, same for v          (net.update_running_stats)
Each epoch visits floor(n / batch_size) mini-batches of a fresh permutation drawn from a
seeded generator (the few examples left over are skipped that epoch). The history is
recorded in eval mode (moving averages) at ``config.eval_steps()``.
With augmentation, each mini-batch is transformed on the fly (:mod:`klayer.levers.augment`);
with dropout, each step draws fresh masks. Shuffling, augmentation and dropout draw from
generators seeded with (seed, stream), so turning one on does not change the others'
draws. With ``precise_bn``, the final statistics are recomputed (:mod:`klayer.levers.bn_stats`)
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
  targets (y_a, y_b, λ) directly);
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

The loop prints nothing and touches no file itself: progress goes to callbacks, and when
a run folder is given, a :class:`klayer.runs.RunFolder` (locked while the run lasts)
writes the checkpoint after every epoch and the model, history, summary and figures at
the end; :func:`finish` does the final evaluation and PreciseBN. A checkpoint holds the
random state, so a resumed run ends with the same weights, bit for bit, as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from klayer import runs
from klayer.levers import augment
from klayer.levers.bn_stats import population_statistics, use_statistics
from klayer.config import TrainConfig
from klayer.levers.ema import EMA
from klayer.nn.errors import UserError
from klayer.nn.network import Network
from klayer.levers.tta import flip_average_accuracy
from klayer.levers.whiten import Whitening
from klayer.nn.optim import make_optimizer
from klayer.nn.schedules import make_schedule

SHUFFLE_STREAM = 1  # the shuffling generator is seeded with (seed, SHUFFLE_STREAM)
AUGMENT_STREAM = 2
DROPOUT_STREAM = 3
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
    new history row), "epoch" after each finished (and checkpointed) epoch.
    """

    kind: str
    step: int  # updates done so far
    total_steps: int
    epoch: float  # step / steps per epoch
    eta: float  # η of the last update
    cost: float  # mini-batch cost of the last update (nan before the first)
    record: dict | None = None


@dataclass
class TrainResult:
    """A finished run: the trained network, its history and its final numbers.

    ``final`` has train_/val_/test_ loss, cost and accuracy of the final network (test
    only if the data has a test set); with PreciseBN, ``final`` uses the recomputed
    statistics and ``final_moving_average`` the moving averages; ``best_*`` is the
    history row with the highest validation accuracy; ``timings`` has train_seconds
    (updates), eval_seconds (history and final evaluation) and total_seconds, summed over
    resumed sessions. With ``ema``, ``final`` is the averaged weights' and
    ``final_without_ema`` the plain weights'. On image data with a test set, ``final``
    also holds ``test_accuracy_tta`` (test-time flip averaging).
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
    run_dir: Path | None = None
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
    in eval mode."""
    out = {}
    for name, (X, y) in splits.items():
        for key, value in net.evaluate(X, y, lam).items():
            out[f"{name}_{key}"] = value
    return out


@np.errstate(over="ignore", invalid="ignore")  # overflow is the divergence guard's to report
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
    num_classes = len(data.class_names) if getattr(data, "class_names", None) else 10
    splits = checked_splits(data, config.dtype, num_classes)
    X_train, y_train = splits["train"]
    n, d = X_train.shape
    B, total, eval_steps = config.batch_size, config.total_steps, set(config.eval_steps())
    steps_per_epoch = _steps_per_epoch(n, B)
    augmentation, mixing = _augmentation(config, d), _mixing(config, d)
    schedule = make_schedule(config)
    emit = _broadcast([*callbacks, *runs.fault_callbacks()])

    def record(step, eta):  # a history point, in eval mode; eta: η_t at this step
        row = state.record(step, eta, seen)
        emit(TrainEvent("eval", step, total, row["epoch"], eta, cost, row))

    with runs.RunFolder(run_dir, config, resume=resume, restart=restart) as folder:
        whitening = None if config.whiten == "none" else \
            folder.whitening(partial(fit_whitening, config, X_train))
        seen = whitened_splits(splits, whitening, config.dtype)  # what the network sees
        X_rows = seen["train"][0] if config.whiten == "zca" else X_train  # batches from
        per_batch = (lambda A: whitening.transform(A, config.dtype)) \
            if config.whiten == "pca" else (lambda A: A)
        batches = Batches(X_rows, y_train, B)
        state = TrainState.start(config, seen["train"][0].shape[1], num_classes,
                                 steps_per_epoch)
        net, optimizer = state.net, state.optimizer
        if resume:
            state.restore(folder.last_checkpoint())
        else:
            folder.checkpoint(state.checkpoint())
        cost = math.nan
        for step in range(state.step, total):
            t0 = time.perf_counter()
            j = step % state.steps_per_epoch
            if j == 0:  # a new epoch (checkpoints fall here too): one permutation
                order = state.shuffle.permutation(n)
            Xb, yb = batches(order, j)
            eta = schedule(step)
            if step == 0:
                state.clock.train_seconds += time.perf_counter() - t0
                _record_initial(net, per_batch(Xb), yb, config.lam, partial(record, 0, eta))
                t0 = time.perf_counter()
            if augmentation.active:
                Xb = augmentation(Xb, state.generators["augment"])
            targets = yb
            if mixing.active:
                Xb, *mixed = mixing(Xb, yb, state.generators["mix"])
                targets = tuple(mixed)  # (y_a, y_b, λ): the loss mixes the two targets
            Xb = per_batch(Xb)
            masks = net.dropout_masks(B, state.generators["dropout"]) if net.dropout else None
            loss = net.loss(Xb, targets, config.lam, mode="train", grads=True, check=False,
                            masks=masks)
            cost = loss.cost
            if not math.isfinite(cost):
                raise _divergence(net, step, eta, f"the mini-batch cost is {cost}", folder)
            optimizer.step(net.params, loss.grads, eta)
            net.update_running_stats(loss.batch_stats)
            if state.ema is not None:
                state.ema.update(net.params)
            state.clock.train_seconds += time.perf_counter() - t0
            state.step = done = step + 1
            epoch, end_of_epoch = done / state.steps_per_epoch, done % state.steps_per_epoch == 0
            emit(TrainEvent("step", done, total, epoch, eta, cost))
            if done in eval_steps:
                record(done, schedule(done))
            if end_of_epoch or done == total:
                _check_finite(net, done, eta, folder)
                folder.checkpoint(state.checkpoint())
                if end_of_epoch:
                    emit(TrainEvent("epoch", done, total, epoch, eta, cost))
        result = finish(state, seen, folder.path, whitening=whitening, raw_splits=splits)
        folder.finish(result, data)
    return result


def with_precise_bn(net, config, splits: dict, final: dict) -> tuple[dict, dict | None]:
    """With ``config.precise_bn``: recompute ``net``'s batch-norm statistics over that many
    training batches (PreciseBN) and return (the results with them, ``final`` as it was
    with the moving averages); otherwise (``final``, None)."""
    if not config.precise_bn:
        return final, None
    use_statistics(net, population_statistics(
        net, splits["train"][0], config.batch_size, config.precise_bn, seed=config.seed))
    return evaluate(net, splits, config.lam), final


def finish(state: "TrainState", splits: dict, run_dir=None, whitening=None,
           raw_splits=None) -> TrainResult:
    """The final evaluation (test set included) of a trained state, through
    :func:`finish_network`; its time is added to the state's eval_seconds.
    splits: as the network sees them (whitened, if so); with a ``whitening``, the
    returned network has it folded into its first layer and takes ``raw_splits``' rows.
    """
    config, net, clock = state.config, state.net, state.clock
    t0 = time.perf_counter()  # train and val were just evaluated: the last history row
    test = evaluate(net, {"test": splits["test"]}, config.lam) if "test" in splits else {}
    result = finish_network(config, net, state.history, test, splits, state.steps_per_epoch,
                            timings={}, ema=state.ema, whitening=whitening,  # {}: below
                            raw_splits=raw_splits, run_dir=run_dir)
    clock.eval_seconds += time.perf_counter() - t0
    return dataclasses.replace(result, timings=clock.as_dict())


def finish_network(config: TrainConfig, net: Network, history: list, test: dict,
                   splits: dict, steps_per_epoch: int, timings: dict, ema: EMA | None = None,
                   whitening=None, raw_splits=None, run_dir=None) -> TrainResult:
    """The TrainResult of a network trained for ``config`` (alone, or as a member of a
    population): ``final`` is the last history row's train and val results and ``test``
    (test_loss, test_cost, test_accuracy, or empty without a test set); with
    ``precise_bn``, the PreciseBN statistics replace the moving averages (the results
    with those are kept in ``final_moving_average``); with ``ema``, the averaged weights
    (statistics recomputed for them) replace the plain ones (kept in
    ``final_without_ema``); on CIFAR-10 images, ``test_accuracy_tta`` is added. PreciseBN
    replaces ``net``'s moving averages in place. splits, whitening, raw_splits: as
    :func:`finish`.
    """
    raw_splits = splits if raw_splits is None else raw_splits
    final = {k: v for k, v in history[-1].items() if k.startswith(("train_", "val_"))}
    final.update(test)
    final_without_ema = None
    final, final_moving_average = with_precise_bn(net, config, splits, final)
    plain = net
    if ema is not None:
        final_without_ema = _with_tta(final, plain, raw_splits, whitening)
        net = build_network(config, plain.input_size, plain.num_classes)
        net.params = {k: v.copy() for k, v in ema.params.items()}
        if net.batch_norm and net.num_layers > 1:
            net.buffers = population_statistics(
                net, splits["train"][0], config.batch_size,
                config.precise_bn or EMA_BN_BATCHES, seed=config.seed)
            net.running_initialised = True
        final = evaluate(net, splits, config.lam)
    final = _with_tta(final, net, raw_splits, whitening)
    if whitening is not None:
        net = fold_whitening(net, whitening)
    best = max(history, key=lambda row: row["val_accuracy"])
    return TrainResult(
        config=config, network=net, history=history, final=final,
        best_val_accuracy=best["val_accuracy"], best_step=best["step"],
        best_epoch=best["epoch"], steps=config.total_steps,
        epochs=config.total_steps / steps_per_epoch, timings=timings,
        run_dir=run_dir, final_moving_average=final_moving_average,
        final_without_ema=final_without_ema,
    )


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
    """Everything the loop changes, and so everything a checkpoint holds: the network,
    the optimizer's state, the three generators, the history, the clock and the step."""

    config: TrainConfig
    net: Network
    optimizer: object
    steps_per_epoch: int
    shuffle: np.random.Generator  # one permutation per epoch
    generators: dict  # "augment", "dropout" and "mix": their own streams
    ema: EMA | None = None  # the weights' moving average, with ``ema``
    history: list = field(default_factory=list)
    clock: _Clock = field(default_factory=_Clock)
    step: int = 0  # updates done

    @classmethod
    def start(cls, config: TrainConfig, input_size: int, num_classes: int,
              steps_per_epoch: int) -> "TrainState":
        seed = config.seed
        return cls(config, build_network(config, input_size, num_classes),
                   make_optimizer(config.optimizer), steps_per_epoch,
                   shuffle=np.random.default_rng([seed, SHUFFLE_STREAM]),
                   generators={"augment": np.random.default_rng([seed, AUGMENT_STREAM]),
                               "dropout": np.random.default_rng([seed, DROPOUT_STREAM]),
                               "mix": np.random.default_rng([seed, MIX_STREAM])},
                   ema=EMA(config.ema) if config.ema else None)

    def record(self, step: int, eta: float, splits: dict) -> dict:
        """Append the history row of ``step`` (train and val in eval mode) and return it."""
        t0 = time.perf_counter()
        row = {"step": step, "epoch": step / self.steps_per_epoch, "eta": eta}
        row.update(evaluate(self.net, {"train": splits["train"], "val": splits["val"]},
                            self.config.lam))
        self.clock.eval_seconds += time.perf_counter() - t0
        self.history.append(row)
        return row

    def checkpoint(self) -> runs.Checkpoint:
        net = self.net
        return runs.Checkpoint(
            step=self.step, epoch=self.step // self.steps_per_epoch, params=net.params,
            buffers=net.buffers, running_initialised=net.running_initialised,
            optimizer_state=self.optimizer.state_dict(),
            rng_state=self.shuffle.bit_generator.state,
            rng_states={name: g.bit_generator.state for name, g in self.generators.items()},
            history=self.history, timings=self.clock.as_dict(),
            config_hash=self.config.config_hash(),
            ema_state=self.ema.state_dict() if self.ema is not None else {},
        )

    def restore(self, ckpt: runs.Checkpoint) -> None:
        """Continue from ``ckpt``: network, optimizer, generators, history and clock."""
        runs.restore_network(self.net, ckpt.params, ckpt.buffers, ckpt.running_initialised,
                             ckpt.source)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.shuffle.bit_generator.state = ckpt.rng_state
        for name, generator in self.generators.items():
            if name in ckpt.rng_states:
                generator.bit_generator.state = ckpt.rng_states[name]
        self.clock.train_seconds = ckpt.timings["train_seconds"]
        self.clock.eval_seconds = ckpt.timings["eval_seconds"]
        self.clock.before = ckpt.timings["total_seconds"]
        self.step, self.history = ckpt.step, ckpt.history
        if self.ema is not None:
            if not ckpt.ema_state and self.step:
                raise UserError(f"{ckpt.source} holds no weight average (ema); start the run "
                                "again")
            if ckpt.ema_state:
                self.ema.load_state_dict(ckpt.ema_state)


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
    those the first update will set (this batch's statistics), then forget them again."""
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


def _check_finite(net, step, eta, folder) -> None:
    """Before a checkpoint: every parameter and moving average must be finite."""
    if _non_finite(net):
        raise _divergence(net, step, eta, "a parameter or moving average is not finite",
                          folder)


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
