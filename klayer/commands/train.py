"""``klayer train``: train a network on CIFAR-10 and leave a run folder.

Options come from ``--config FILE.toml`` (if given), then the flags, which override it.
``--resume RUN`` continues an interrupted run with the configuration saved in RUN.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from klayer import memory
from klayer.nn.errors import UserError
from klayer.config import TrainConfig, add_option_flags, flag_name, flags_given

RESUMABLE_OPTIONS = {"data_dir"}  # where the data is may change between sessions


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a network on CIFAR-10",
        description="Train a k-layer network on CIFAR-10 with mini-batch gradient descent "
                    "(SGD, momentum or Adam) and a learning-rate schedule (cyclical by "
                    "default). Flags override --config.")
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="options from a TOML file")
    add_option_flags(p, beyond=p.add_argument_group("beyond the study (all off by default)"))
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
    memory.check_fits(memory.estimate(config), "this run")  # before anything is allocated
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
    plain = result.final_without_ema or f  # the plain weights' results
    if result.final_moving_average is not None:
        m = result.final_moving_average
        log.line(f"with the moving averages: test accuracy {m['test_accuracy']:.2%}; "
                 f"with PreciseBN ({config.precise_bn} batches): {plain['test_accuracy']:.2%}")
    if result.final_without_ema is not None:
        log.line(f"plain weights: test accuracy {plain['test_accuracy']:.2%}; their moving "
                 f"average (ema {config.ema:g}), the saved model: {f['test_accuracy']:.2%}")
    if "test_accuracy_tta" in f:
        log.line(f"with test-time flip averaging: test accuracy {f['test_accuracy_tta']:.2%}")
    log.line(f"test accuracy {f['test_accuracy']:.2%} (loss {f['test_loss']:.4f}); "
             f"validation {f['val_accuracy']:.2%}, best {result.best_val_accuracy:.2%} at "
             f"step {result.best_step}; {result.timings['total_seconds']:.0f} s")
    log.line(f"run folder: {run_dir}")
    return 0


def resolve_config(args) -> tuple[TrainConfig, Path]:
    """The configuration and run folder from --resume, or from --config and the flags."""
    from klayer import runs

    flags = flags_given(args)
    if args.resume is not None:
        given = sorted(flag_name(name) for name in flags if name not in RESUMABLE_OPTIONS)
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
    from klayer.levers.augment import describe

    augmentation = describe(config)
    extras += [f"augmentation: {augmentation}"] if augmentation != "none" else []
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
