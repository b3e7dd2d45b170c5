"""Population benchmark: a λ grid of K networks trained as one population against one run.

The 3-layer [50, 50] batch-norm network on real CIFAR-10 (45,000 training images), cyclic
η from 1e-5 to 0.1, n_s = 900, 2 cycles: K = 8 configs that differ only in λ (log-spaced
from 1e-4 to 1e-1) trained together by :func:`klayer.train.train_population`,
against the first of them trained alone by :func:`klayer.train.train`. Both record the
same history (10 evaluations of the training and validation sets per cycle).

Printed: wall time of each (split into the update loop, ``train_seconds``, and the
history and final evaluations, ``eval_seconds``), and the ratios population / one run
(target: the grid of 8 in at most 2× one run's time).

Run:  python benchmarks/bench_population.py --data-dir PATH/cifar-10-batches-py
      [--k 8] [--n-s 900] [--cycles 2] [--dtype float32] [--subset N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from klayer.config import TrainConfig
from klayer.data import load_cifar10
from klayer.train import train, train_population


def lam_grid(k: int) -> list[float]:
    """K values of λ, log-spaced from 1e-4 to 1e-1."""
    return [float(lam) for lam in np.logspace(-4, -1, k)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KLAYER_DATA"),
                        help="the cifar-10-batches-py folder (default: $KLAYER_DATA)")
    parser.add_argument("--k", type=int, default=8, help="population size (default 8)")
    parser.add_argument("--n-s", type=int, default=900, help="half-cycle length (default 900)")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--subset", type=int, help="first N images of each split (quick runs)")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("--data-dir: give the cifar-10-batches-py folder (or set KLAYER_DATA)")

    data = load_cifar10(args.data_dir, subset=args.subset, dtype=args.dtype, download=False)
    base = TrainConfig(hidden_sizes=(50, 50), batch_norm=True, dtype=args.dtype,
                       n_s=args.n_s, cycles=args.cycles, subset=args.subset)
    configs = [base.replace(lam=lam) for lam in lam_grid(args.k)]

    t0 = time.perf_counter()
    results = train_population(configs, data)
    population_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = train(configs[0], data)
    alone_wall = time.perf_counter() - t0

    members = [r for r in results if hasattr(r, "timings")]
    timings = members[0].timings if members else {"train_seconds": float("nan"),
                                                  "eval_seconds": float("nan")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"numpy {np.__version__}, {args.dtype}, {len(data.X_train)} training images, "
          f"n_s = {args.n_s}, {args.cycles} cycles ({base.total_steps} steps), "
          f"load average {load:.1f} at the end\n")
    print("| run | members | wall s | update loop s | evaluation s |")
    print("|---|---|---|---|---|")
    print(f"| population (λ grid) | {args.k} | {population_wall:.1f} | "
          f"{timings['train_seconds']:.1f} | {timings['eval_seconds']:.1f} |")
    print(f"| one run (λ = {configs[0].lam:g}) | 1 | {alone_wall:.1f} | "
          f"{alone.timings['train_seconds']:.1f} | {alone.timings['eval_seconds']:.1f} |")
    print(f"\npopulation / one run: wall {population_wall / alone_wall:.2f}×, update loop "
          f"{timings['train_seconds'] / alone.timings['train_seconds']:.2f}× "
          f"(against {args.k}× for {args.k} separate runs)")
    dropped = len(results) - len(members)
    print("final validation accuracy by λ: " + ", ".join(
        f"{c.lam:.2g}: {r.final['val_accuracy']:.4f}" if hasattr(r, "final")
        else f"{c.lam:.2g}: dropped" for c, r in zip(configs, results))
        + (f" ({dropped} dropped)" if dropped else ""))


if __name__ == "__main__":
    main()
