"""``klayer train``: train a network on CIFAR-10 and leave a run folder.

Options come from ``--config FILE.toml`` (if given), then the flags, which override it.
``--resume RUN`` continues an interrupted run with the configuration saved in RUN.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from klayer.cli import UserError
from klayer.config import DTYPES, NORM_POSITIONS, PROTOCOLS, TrainConfig
from klayer.optim import OPTIMIZERS
from klayer.schedules import SCHEDULES

# flag destination -> TrainConfig field, for the flags that set an option
OPTION_FLAGS = {
    "hidden": "hidden_sizes", "batch_norm": "batch_norm", "lam": "lam",
    "eta_min": "eta_min", "eta_max": "eta_max", "n_s": "n_s", "cycles": "cycles",
    "batch_size": "batch_size", "init": "init", "seed": "seed", "dtype": "dtype",
    "schedule": "schedule", "optimizer": "optimizer", "evals_per_cycle": "evals_per_cycle",
    "data_dir": "data_dir",
    "protocol": "protocol", "n_val": "n_val", "subset": "subset", "out": "out",
    "layer_norm": "layer_norm", "norm_position": "norm_position", "residual": "residual",
    "dropout": "dropout", "label_smoothing": "label_smoothing", "flip": "flip",
    "translate": "translate", "jitter": "jitter", "decay_rate": "decay_rate",
    "decay_every": "decay_every", "warmup_steps": "warmup_steps", "precise_bn": "precise_bn",
}
RESUMABLE_FLAGS = {"data_dir"}  # where the data is may change between sessions


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a network on CIFAR-10",
        description="Train a k-layer network on CIFAR-10 with mini-batch gradient descent "
                    "(SGD, momentum or Adam) and a learning-rate schedule (cyclical by "
                    "default). Flags override --config.")
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="options from a TOML file")
    p.add_argument("--hidden", type=_hidden_sizes, metavar="W1,W2,...",
                   help="hidden layer widths, e.g. 50,50 (empty: no hidden layer)")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch normalization in the hidden layers (default on)")
    p.add_argument("--lambda", dest="lam", type=float, metavar="λ", help="L2 penalty λ")
    p.add_argument("--eta-min", type=float, metavar="η", help="smallest learning rate")
    p.add_argument("--eta-max", type=float, metavar="η", help="largest learning rate")
    p.add_argument("--n-s", type=int, metavar="STEPS", help="steps of a half cycle")
    p.add_argument("--cycles", type=int, help="number of cycles (2·n_s steps each)")
    p.add_argument("--batch-size", type=int, help="mini-batch size")
    p.add_argument("--init", type=_init, metavar="he|xavier|σ", help="weight initialisation")
    p.add_argument("--seed", type=int, help="seed of the weights and the shuffling")
    p.add_argument("--dtype", choices=DTYPES, help="float precision")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule: cyclic (default), constant (η = eta_max), "
                        "step (see --decay-rate) or cosine (eta_max down to eta_min)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS),
                   help="parameter update: sgd (default), momentum (μ = 0.9) or adam "
                        "(β = 0.9, 0.999)")
    p.add_argument("--decay-rate", type=float, metavar="R",
                   help="schedule step: multiply η by R every --decay-every steps (default 0.1)")
    p.add_argument("--decay-every", type=int, metavar="STEPS",
                   help="schedule step: steps between drops (default n_s)")
    p.add_argument("--warmup-steps", type=int, metavar="STEPS",
                   help="linear warm-up before a constant, step or cosine schedule")
    p.add_argument("--evals-per-cycle", type=int, metavar="N", help="history points per cycle")
    beyond = p.add_argument_group("beyond the study (all off by default)")
    beyond.add_argument("--layer-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="layer normalization instead of batch norm (with --no-batch-norm)")
    beyond.add_argument("--norm-position", choices=NORM_POSITIONS,
                        help="normalise before the ReLU (default) or after it")
    beyond.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                        help="residual connections between hidden layers of equal width")
    beyond.add_argument("--dropout", type=float, metavar="P",
                        help="inverted dropout probability on the hidden layers")
    beyond.add_argument("--label-smoothing", type=float, metavar="ε", help="label smoothing ε")
    beyond.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="augment: random horizontal flips")
    beyond.add_argument("--translate", type=int, metavar="PX",
                        help="augment: random translations of up to PX pixels")
    beyond.add_argument("--jitter", type=float, metavar="J",
                        help="augment: random contrast (1±J) and brightness (±J)")
    beyond.add_argument("--precise-bn", type=int, metavar="BATCHES",
                        help="after training, recompute the batch-norm statistics over "
                             "BATCHES training batches (PreciseBN)")
    p.add_argument("--data-dir", metavar="DIR", help="where CIFAR-10 is (default: $KLAYER_DATA)")
    p.add_argument("--protocol", choices=PROTOCOLS, help="data split (full: 45k/5k/10k)")
    p.add_argument("--n-val", type=int, metavar="N", help="validation images (protocol full)")
    p.add_argument("--subset", type=int, metavar="N", help="use only N images of each split")
    p.add_argument("--out", metavar="RUN", help="run folder (default runs/<name>)")
    p.add_argument("--name", help="run name for the default folder runs/<name> "
                                  "(default: the config file's name and the time)")
    p.add_argument("--resume", metavar="RUN", type=Path, help="continue an interrupted run")
    p.add_argument("--restart", action="store_true",
                   help="start again in an --out folder that already holds a run")
    p.add_argument("--quiet", action="store_true",
                   help="plain log lines instead of a progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    from klayer.data import load_data
    from klayer.train import train

    config, run_dir = resolve_config(args)
    log = _Log(args.quiet)
    log.line(f"{'resuming' if args.resume else 'training'} {_describe(config)} in {run_dir}")
    t0 = time.perf_counter()
    data = load_data(config, progress=not args.quiet)
    log.line(f"data: {len(data.X_train)} train, {len(data.X_val)} validation, "
             f"{len(data.X_test)} test images ({time.perf_counter() - t0:.1f} s)")
    try:
        with warnings.catch_warnings():  # e.g. a damaged checkpoint: one line, not a trace
            warnings.showwarning = lambda message, *_, **__: print(
                f"klayer train: warning: {message}", file=sys.stderr, flush=True)
            result = train(config, data, run_dir, callbacks=[log.event],
                           resume=args.resume is not None, restart=args.restart)
    except KeyboardInterrupt:
        log.close()
        print(f"interrupted: continue with `klayer train --resume {run_dir}`", file=sys.stderr)
        raise
    finally:
        log.close()
    f = result.final
    if result.final_moving_average is not None:
        m = result.final_moving_average
        log.line(f"with the moving averages: test accuracy {m['test_accuracy']:.2%}; "
                 f"with PreciseBN ({config.precise_bn} batches): {f['test_accuracy']:.2%}")
    log.line(f"test accuracy {f['test_accuracy']:.2%} (loss {f['test_loss']:.4f}); "
             f"validation {f['val_accuracy']:.2%}, best {result.best_val_accuracy:.2%} at "
             f"step {result.best_step}; {result.timings['total_seconds']:.0f} s")
    log.line(f"run folder: {run_dir}")
    return 0


def resolve_config(args) -> tuple[TrainConfig, Path]:
    """The configuration and run folder from --resume, or from --config and the flags."""
    from klayer import runs

    flags = {field: getattr(args, dest) for dest, field in OPTION_FLAGS.items()}
    if args.resume is not None:
        given = sorted(_flag_name(d) for d, f in OPTION_FLAGS.items()
                       if flags[f] is not None and d not in RESUMABLE_FLAGS)
        if args.restart:
            given.append("--restart")
        if given or args.config or args.name:
            raise UserError(f"--resume takes the configuration saved in {args.resume}; "
                            f"drop {', '.join(given) or '--config/--name'}")
        config = runs.read_config(args.resume).with_overrides({"data_dir": args.data_dir})
        return config, args.resume
    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    config = config.with_overrides(flags)
    run_dir = Path(config.out) if config.out else _default_run_dir(args)
    return config.replace(out=str(run_dir)), run_dir


def _flag_name(dest: str) -> str:
    return {"lam": "--lambda"}.get(dest, "--" + dest.replace("_", "-"))


def _default_run_dir(args) -> Path:
    name = args.name or "-".join(filter(None, [args.config.stem if args.config else None,
                                               time.strftime("%Y%m%d-%H%M%S")]))
    run_dir, i = Path("runs") / name, 2
    while run_dir.exists() and not args.name:
        run_dir, i = Path("runs") / f"{name}-{i}", i + 1
    return run_dir


def _describe(config: TrainConfig) -> str:
    widths = ",".join(map(str, config.hidden_sizes)) or "none"
    norm = ("batch norm" if config.batch_norm else "layer norm" if config.layer_norm
            else "no normalization")
    if config.norm_position == "after" and (config.batch_norm or config.layer_norm):
        norm += " after ReLU"
    extras = [f"{config.optimizer}, {config.schedule} schedule"]
    extras += ["residual"] if config.residual else []
    extras += [f"dropout {config.dropout:g}"] if config.dropout else []
    extras += [f"label smoothing {config.label_smoothing:g}"] if config.label_smoothing else []
    from klayer.augment import from_config

    augmentation = from_config(config)
    extras += [f"augmentation: {augmentation.describe()}"] if augmentation.active else []
    return (f"{len(config.hidden_sizes) + 1}-layer network (hidden {widths}, {norm}, "
            f"{config.dtype}; {'; '.join(extras)}) for {config.total_steps} steps")


class _Log:
    """Progress of a run: a tqdm bar on stderr, or (quiet) one line per history point."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.last = quiet, None, ""

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def event(self, e) -> None:
        if e.kind == "eval":
            r = e.record
            self.last = (f"cost {r['train_cost']:.3f}/{r['val_cost']:.3f} "
                         f"acc {r['train_accuracy']:.3f}/{r['val_accuracy']:.3f}")
            if self.quiet:
                self.line(f"step {e.step}/{e.total_steps} epoch {e.epoch:.2f} η {r['eta']:.3g} "
                          f"train/val {self.last}")
        if self.quiet or e.kind != "step":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=e.total_steps, initial=e.step - 1, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.bar.set_postfix_str(f"η {e.eta:.3g} train/val {self.last}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hidden_sizes(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 50,50, got {text!r}") from None


def _init(text: str):
    if text in ("he", "xavier"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected he, xavier or a number σ, got {text!r}") \
            from None
