"""Training-epoch benchmark: klayer's own training loop against the same epoch in PyTorch.

One epoch of 45,000 in-memory float32 examples (random data, 3,072 inputs, 10 classes),
batch 100: a fresh permutation, then 450 steps of batch gather, forward, backward, SGD
with the cyclical learning rate and the moving-average update. klayer runs
:func:`klayer.train.train` (one cycle with n_s = 225 = one epoch) and reports its
``train_seconds`` (the update loop, without the history evaluations); PyTorch runs the
same loop written with ``torch.randperm``, ``torch.optim.SGD`` and ``nn.BatchNorm1d``.

Run:  python benchmarks/bench_epoch.py [--reps 3] [--hidden 50,50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from bench_step import LAM, torch_model  # same network layout as the step benchmark
from klayer.config import TrainConfig
from klayer.nn.schedules import CyclicLR
from klayer.train import train

N, INPUT, CLASSES, BATCH = 45000, 3072, 10, 100


def klayer_epoch(data, hidden) -> float:
    config = TrainConfig(hidden_sizes=tuple(hidden), batch_norm=True, lam=LAM, dtype="float32",
                         n_s=N // BATCH // 2, cycles=1, batch_size=BATCH, evals_per_cycle=1)
    return train(config, data).timings["train_seconds"]


def torch_epoch(X, y, hidden) -> float:
    model = torch_model([INPUT, *hidden, CLASSES]).train()
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    schedule = CyclicLR(1e-5, 1e-1, N // BATCH // 2)
    t0 = time.perf_counter()
    order = torch.randperm(N)
    Xe, ye = X[order], y[order]
    for step in range(N // BATCH):
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        Xb, yb = Xe[step * BATCH:(step + 1) * BATCH], ye[step * BATCH:(step + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        cost = torch.nn.functional.cross_entropy(model(Xb), yb)
        cost = cost + LAM * sum((W * W).sum() for W in weights)
        cost.backward()
        opt.step()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", default="50,50")
    args = parser.parse_args()
    hidden = [int(h) for h in args.hidden.split(",")]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, INPUT), dtype=np.float32)
    y = rng.integers(0, CLASSES, N)
    data = SimpleNamespace(X_train=X, y_train=y, X_val=X[:1000], y_val=y[:1000])
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    ours, theirs = [], []
    for _ in range(args.reps):  # interleaved, so that noise hits both alike
        ours.append(klayer_epoch(data, hidden))
        theirs.append(torch_epoch(Xt, yt, hidden))
    k, t = statistics.median(ours), statistics.median(theirs)
    print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), float32, median of {args.reps}\n")
    print("| network | batch | klayer s/epoch | torch s/epoch | klayer/torch |")
    print("|---|---|---|---|---|")
    print(f"| {hidden} BN | {BATCH} | {k:.2f} | {t:.2f} | {k / t:.2f} |")


if __name__ == "__main__":
    main()
