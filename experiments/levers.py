"""What each lever is worth to the best MLP, on a short budget: one table.

Trains the architecture and optimiser of ``configs/best_mlp.toml`` (3072 → 1024 → 512
→ 256 → 10, batch norm, dropout, flips and translations, momentum SGD, cosine with a
warm-up of the same share of training) for ``--epochs`` epochs, once per training
variant:

    baseline   best_mlp as it is (translations pad with the mean)
    reflect    translations padding by reflection (crops of the reflect-padded image)
    zca        ZCA whitening (ε = --whiten-eps) of every augmented batch
    zca-once   ZCA (fitted mirror-symmetric) of every image once, then augmentation of
               the whitened images: flips commute with it exactly, translations up to
               the border pixels; no per-batch product
    pca        PCA whitening to --pca-components inputs
    mixup      MixUp (α = --mixup-alpha), soft targets
    cutmix     CutMix (α = --cutmix-alpha), soft targets

and evaluates each trained network four ways on the test set: plain (batch-norm moving
averages), with the EMA of the weights (decay --ema-decay, batch-norm statistics
recomputed for the averaged weights from --bn-batches training batches), with
test-time flip averaging (TTA), and with both. EMA and TTA do not change training,
so they are columns, measured on every variant.

The modules are composed here directly (klayer.levers.augment, klayer.levers.whiten, klayer.levers.ema,
klayer.levers.tta with Network, Momentum, CosineLR). The same levers are options of
``klayer train`` (``--pad-mode``, ``--mixup``, ``--cutmix``, ``--whiten zca|pca``,
``--ema``; flip TTA in every summary), where ``--whiten zca`` is this script's
"zca-once".

Run (about 1–1.5 min per variant and epoch on an idle 2-core machine):
    python experiments/levers.py --data-dir /path/to/cifar-10-batches-py --epochs 5
Quick check of the script itself:
    python experiments/levers.py --data-dir ... --epochs 1 --subset 2000
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from klayer.levers.augment import Augmentation, Mixing, mirror, soft_targets
from klayer.data import load_cifar10
from klayer.levers.ema import EMA
from klayer.nn.network import Network
from klayer.nn.optim import Momentum
from klayer.nn.schedules import CosineLR, WarmUp
from klayer.levers.tta import flip_average_accuracy
from klayer.levers.whiten import Whitening

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("baseline", "reflect", "zca", "zca-once", "pca", "mixup", "cutmix")
SHUFFLE, AUGMENT, DROPOUT, MIXING = 1, 2, 3, 4  # generator streams, seeded (seed, stream)


def soft_target_loss(net, X, T, lam, masks):
    """Cost, gradients and batch statistics of the cross-entropy against target
    distributions T: (n, C) (or (y_a, y_b, λ)), J = -(1/n) Σ_i Σ_c t_ic log p_ic +
    λ Σ ||W||²: the library's loss, which takes soft targets."""
    result = net.loss(X, T, lam, mode="train", check=False, masks=masks)
    return result.cost, result.grads, result.batch_stats


def run_variant(variant, data, cfg, args):
    """Train one variant; return its row of the table."""
    dtype, B, seed = cfg["dtype"], cfg["batch_size"], args.seed
    X_train, X_val, X_test = data.X_train, data.X_val, data.X_test
    whitening, prepare = None, None  # prepare: per-batch map after augmentation
    t0 = time.perf_counter()
    if variant in ("zca", "pca"):
        whitening = Whitening.fit(X_train, variant, args.whiten_eps,
                                  args.pca_components if variant == "pca" else None)
        prepare = lambda A: whitening.transform(A, dtype)  # noqa: E731
    elif variant == "zca-once":
        mirror_columns = mirror(np.arange(X_train.shape[1])[None])[0]
        whitening = Whitening.fit(X_train, "zca", args.whiten_eps, symmetry=mirror_columns)
        X_train, X_val, X_test = (whitening.transform(A, dtype) for A in (X_train, X_val, X_test))
    fit_seconds = time.perf_counter() - t0
    identity = prepare is None
    if identity:
        prepare = lambda A: A  # noqa: E731
    net = Network(prepare(X_train[:2]).shape[1], cfg["hidden_sizes"], 10,
                  batch_norm=cfg["batch_norm"], init=cfg["init"], dtype=dtype, seed=seed,
                  dropout=cfg.get("dropout", 0.0))
    augmentation = Augmentation(flip=cfg.get("flip", False), translate=cfg.get("translate", 0),
                                pad_mode="reflect" if variant == "reflect" else "mean")
    mixing = Mixing(mixup=args.mixup_alpha if variant == "mixup" else 0.0,
                    cutmix=args.cutmix_alpha if variant == "cutmix" else 0.0)
    optimizer = Momentum(0.9)
    n = len(X_train)
    steps_per_epoch = n // B
    total = args.epochs * steps_per_epoch
    warmup = round(total * cfg["warmup_steps"] / (cfg["cycles"] * 2 * cfg["n_s"]))
    schedule = CosineLR(cfg["eta_min"], cfg["eta_max"], total - warmup)
    schedule = WarmUp(schedule, warmup) if warmup else schedule
    rng = {s: np.random.default_rng([seed, s]) for s in (SHUFFLE, AUGMENT, DROPOUT, MIXING)}
    ema = EMA(args.ema_decay)
    lam = cfg["lam"]
    seconds = {"whiten": 0.0, "ema": 0.0}
    t_train = time.perf_counter()
    for step in range(total):
        j = step % steps_per_epoch
        if j == 0:
            order = rng[SHUFFLE].permutation(n)
            X_epoch, y_epoch = X_train[order], data.y_train[order]
        Xb, yb = X_epoch[j * B:(j + 1) * B], y_epoch[j * B:(j + 1) * B]
        Xb = augmentation(Xb, rng[AUGMENT])
        if mixing.active:
            Xb, y_a, y_b, weights = mixing(Xb, yb, rng[MIXING])
        t0 = time.perf_counter()
        Xb = prepare(Xb)
        seconds["whiten"] += time.perf_counter() - t0
        masks = net.dropout_masks(B, rng[DROPOUT]) if net.dropout else None
        if mixing.active:
            T = soft_targets(y_a, y_b, weights, 10, dtype=dtype)
            cost, grads, stats = soft_target_loss(net, Xb, T, lam, masks)
        else:
            result = net.loss(Xb, yb, lam, mode="train", check=False, masks=masks)
            cost, grads, stats = result.cost, result.grads, result.batch_stats
        if not math.isfinite(cost):
            raise SystemExit(f"levers.py: error: {variant} diverged at step {step}")
        optimizer.step(net.params, grads, schedule(step))
        net.update_running_stats(stats)
        t0 = time.perf_counter()
        ema.update(net.params, net.buffers)
        seconds["ema"] += time.perf_counter() - t0
    train_seconds = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    tta = {"preprocess": None if identity else prepare}
    X_test_in = prepare(X_test)
    row = {"variant": variant, "val": net.evaluate(prepare(X_val), data.y_val)["accuracy"],
           "test": net.evaluate(X_test_in, data.y_test)["accuracy"],
           "test_tta": flip_average_accuracy(net, X_test, data.y_test, **tta)}
    bn_rows = X_train[np.random.default_rng(seed).permutation(n)[:args.bn_batches * B]]
    with ema.averaged(net, bn_data=prepare(bn_rows), batch_size=B, num_batches=None):
        row["test_ema"] = net.evaluate(X_test_in, data.y_test)["accuracy"]
        row["test_ema_tta"] = flip_average_accuracy(net, X_test, data.y_test, **tta)
    row.update(train_s=train_seconds, eval_s=time.perf_counter() - t_eval,
               ms_per_step=1e3 * train_seconds / total,
               whiten_ms=1e3 * seconds["whiten"] / total, ema_ms=1e3 * seconds["ema"] / total,
               whiten_fit_s=fit_seconds if whitening is not None else None, steps=total)
    return row


def table(rows) -> str:
    base = next((r["test"] for r in rows if r["variant"] == "baseline"), None)
    lines = ["| variant | test | Δ test | +EMA | +TTA | +EMA+TTA | val | train s | ms/step "
             "| whiten ms/batch | EMA ms/step |", "|" + "---|" * 11]
    for r in rows:
        delta = f"{100 * (r['test'] - base):+.2f}" if base is not None else ""
        whiten = f"{r['whiten_ms']:.1f} (setup {r['whiten_fit_s']:.0f} s)" \
            if r["whiten_fit_s"] is not None else "–"
        lines.append(f"| {r['variant']} | {100 * r['test']:.2f}% | {delta} | "
                     f"{100 * r['test_ema']:.2f}% | {100 * r['test_tta']:.2f}% | "
                     f"{100 * r['test_ema_tta']:.2f}% | {100 * r['val']:.2f}% | "
                     f"{r['train_s']:.0f} | {r['ms_per_step']:.1f} | {whiten} | "
                     f"{r['ema_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="levers.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--config", default=str(ROOT / "configs" / "best_mlp.toml"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subset", type=int, default=None,
                        help="keep only the first N images of each split (quick checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--bn-batches", type=int, default=50,
                        help="training batches for the EMA weights' batch-norm statistics")
    parser.add_argument("--whiten-eps", type=float, default=1e-2)
    parser.add_argument("--pca-components", type=int, default=512)
    parser.add_argument("--mixup-alpha", type=float, default=0.2)
    parser.add_argument("--cutmix-alpha", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    try:
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {args.config}: {exc}")
    try:
        data = load_cifar10(args.data_dir, cfg.get("protocol", "full"), cfg.get("n_val", 5000),
                            args.subset, cfg["dtype"], download=False)
    except ValueError as exc:
        parser.error(f"--data-dir {args.data_dir}: {exc}")
    print(f"# levers on {Path(args.config).name}: {args.epochs} epochs, "
          f"{len(data.X_train)} training images, seed {args.seed}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"numpy {np.__version__}, cpu_count {os.cpu_count()}, load average at start "
          f"{os.getloadavg()[0]:.1f}\n", flush=True)
    whitened = [v for v in args.variants if v in ("zca", "zca-once", "pca")]
    if whitened and len(data.X_train) <= data.X_train.shape[1]:
        print(f"note: {', '.join(whitened)} fitted on {len(data.X_train)} rows of "
              f"{data.X_train.shape[1]} values: the training rows do not span the input "
              "space, so test rows carry directions training never saw, amplified by the "
              "whitening; expect chance-level accuracy (a check of the script, not a "
              "measurement)\n")
    rows = []
    for variant in args.variants:
        rows.append(run_variant(variant, data, cfg, args))
        r = rows[-1]
        print(f"{variant}: test {100 * r['test']:.2f}%, +EMA {100 * r['test_ema']:.2f}%, "
              f"+TTA {100 * r['test_tta']:.2f}%  ({r['train_s']:.0f} s)", flush=True)
    print()
    print(table(rows))
    print(f"\nEMA: decay {args.ema_decay} with warm-up, batch-norm statistics recomputed from "
          f"{args.bn_batches} training batches. TTA: mean of the softmax of each test image "
          f"and its mirror. Whitening ε = {args.whiten_eps}, PCA {args.pca_components} "
          f"components. MixUp α = {args.mixup_alpha}, CutMix α = {args.cutmix_alpha}.")


if __name__ == "__main__":
    main()
