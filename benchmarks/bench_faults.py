"""Memory churn of the training loop: minor page faults and fresh allocations per epoch.

Trains the 3-layer [50, 50] batch-norm network (float32, batch 100, one cycle of
``--epochs`` epochs, 2 history evaluations of the 45,000 + 5,000 rows per epoch) with
:func:`klayer.train.train`, or ``--population K`` members differing in λ with
:func:`klayer.train.train_population`, and prints per epoch the minor page faults
of the process (``getrusage``: each is fresh memory the kernel had to map and zero) and
the peak of memory allocated above the epoch's start (``tracemalloc``, which NumPy
reports to). Epoch 1 includes the run's setup (checks of the data, the first
allocations). Counts, not times: they mean the same on a busy machine.

Run:  python benchmarks/bench_faults.py [--data-dir PATH/cifar-10-batches-py]
      [--epochs 3] [--population K]
Without --data-dir: random data of CIFAR-10's shapes (the counts do not depend on the
values).
"""

from __future__ import annotations

import argparse
import resource
import tracemalloc
from types import SimpleNamespace

import numpy as np

from klayer.config import TrainConfig
from klayer.data import load_cifar10
from klayer.train import train, train_population

N_TRAIN, N_VAL, N_TEST, INPUT, BATCH = 45000, 5000, 10000, 3072, 100


def random_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N_TRAIN + N_VAL + N_TEST, INPUT), dtype=np.float32)
    y = rng.integers(0, 10, len(X))
    a, b = N_TRAIN, N_TRAIN + N_VAL
    return SimpleNamespace(X_train=X[:a], y_train=y[:a], X_val=X[a:b], y_val=y[a:b],
                           X_test=X[b:], y_test=y[b:])


class EpochCounter:
    """Page faults and tracemalloc peak (above the start) of each epoch."""

    def __init__(self):
        self.rows = []
        self.start()

    def start(self):
        tracemalloc.reset_peak()
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.base = tracemalloc.get_traced_memory()[0]

    def end(self):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults
        self.rows.append((faults, tracemalloc.get_traced_memory()[1] - self.base))
        self.start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="the cifar-10-batches-py folder (default: random "
                        "data of its shapes)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--population", type=int, default=0, metavar="K",
                        help="train K members differing in λ as one population")
    args = parser.parse_args()
    data = load_cifar10(args.data_dir) if args.data_dir else random_data()
    steps_per_epoch = len(data.X_train) // BATCH
    config = TrainConfig(hidden_sizes=(50, 50), batch_norm=True, lam=0.005, dtype="float32",
                         batch_size=BATCH, n_s=args.epochs * steps_per_epoch // 2, cycles=1,
                         evals_per_cycle=2 * args.epochs)
    tracemalloc.start()
    counter = EpochCounter()
    if args.population:
        configs = [config.replace(lam=float(lam))
                   for lam in np.logspace(-4, -1, args.population)]
        train_population(configs, data, callbacks=[
            lambda step, active: step % steps_per_epoch or counter.end()])
    else:
        train(config, data, callbacks=[lambda event: event.kind == "epoch" and counter.end()])
    what = f"population of {args.population}" if args.population else "one network"
    print(f"[50, 50] BN, float32, batch {BATCH}, {what}, "
          f"{'CIFAR-10' if args.data_dir else 'random data'}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 // 10**6} MB\n")
    print("| epoch | minor page faults | allocated above the epoch's start (MB) |")
    print("|---|---|---|")
    for epoch, (faults, peak) in enumerate(counter.rows, 1):
        print(f"| {epoch} | {faults} | {peak / 1e6:.1f} |")


if __name__ == "__main__":
    main()
