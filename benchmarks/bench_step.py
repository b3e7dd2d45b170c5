"""Training-step benchmark: klayer against PyTorch (CPU) on the same work.

One training step = forward + backward of the cost (mean cross-entropy + λ Σ ||W||²)
with batch norm in training mode, the moving-average update, then a plain SGD update
p -= η g of every parameter (klayer: the training loop's calls, the L2 term 2λW added
inside the SGD update, ``loss(..., l2_gradient=False)`` then
``SGD().step(params, grads, η, l2=net.l2_term(λ))``). With JAX installed (the
``bench`` extra) the table has JAX's step too, and the run ends with the ratios of
klayer's step time to PyTorch's and to JAX's for every case. The libraries run the
same shapes in float32 on the same pre-gathered contiguous mini-batches.

Printed per case: the median time per step of each library over the repetitions, their
ratio (and the ratio of the best repetitions, a guide when other processes load the
machine), the achieved GFLOP/s of each step, and the matrix-product "peak" for the same
shapes: the bare products of one step, timed alone in NumPy and in torch. The last
column is the fraction of klayer's step spent in those bare products.

Flops of one step: 2·n·d·m per matrix product; the forward pass has one product per
layer, the backward pass two (dW and dx) except the first layer's dx (never computed).

With ``--population K``, a second table: one step of K networks trained as a population
(:class:`klayer.nn.population.Population`: parameters stacked (K, ...), one first-layer
product for all members, per-member λ and η) against one network's step, same batches.

Run:  python benchmarks/bench_step.py [--reps 7] [--steps N] [--cases 0 1 2]
                                      [--population 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from klayer.nn.network import Network
from klayer.nn.optim import SGD
from klayer.nn.population import Population

try:  # the JAX peer is optional: pip install -e ".[bench]"
    import peer_jax
except ImportError:
    peer_jax = None

INPUT, CLASSES, LAM, LR = 3072, 10, 0.005, 0.01
CASES = [  # (name, hidden sizes, batch size, steps per repetition)
    ("3-layer [50, 50] BN", [50, 50], 100, 100),
    ("9-layer [50, 30, 20, 20, 10, 10, 10, 10] BN", [50, 30, 20, 20, 10, 10, 10, 10], 100, 100),
    ("wide [1024, 512, 256] BN", [1024, 512, 256], 256, 20),
]
N_BATCHES = 8  # distinct mini-batches cycled through, as a training loop would


def step_flops(sizes, n):
    """Flops of the matrix products of one training step."""
    flops = 0
    for l, (d, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        products = 3 if l > 0 else 2  # forward, dW, dx (none for the first layer)
        flops += products * 2 * n * d * m
    return flops


def time_per_step(step, steps):
    """Wall time of ``steps`` consecutive calls of ``step(i)``, divided by ``steps``."""
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - t0) / steps


# --- klayer -------------------------------------------------------------------------


def klayer_step_fn(sizes, batches):
    """The training loop's step with plain SGD, the L2 term added inside the update
    (``loss(..., l2_gradient=False)`` and ``SGD.step(..., l2=net.l2_term(λ))``)."""
    net = Network(sizes[0], sizes[1:-1], sizes[-1], batch_norm=True, dtype="float32", seed=0)
    optimizer = SGD()
    l2 = net.l2_term(LAM)

    def step(i):
        X, y = batches[i % len(batches)]
        res = net.loss(X, y, LAM, mode="train", check=False, l2_gradient=False)
        net.update_running_stats(res.batch_stats)
        optimizer.step(net.params, res.grads, LR, l2=l2)
    return step


def population_step_fn(sizes, batches, k):
    """One step of K members differing in seed, λ and η (a λ grid, as a search runs)."""
    pop = Population.build(k, sizes[0], sizes[1:-1], sizes[-1], batch_norm=True,
                           dtype="float32", seed=list(range(k)))
    lam, lr = np.geomspace(1e-4, 1e-1, k), np.full(k, LR)
    optimizer = SGD()

    def step(i):
        X, y = batches[i % len(batches)]
        res = pop.loss(X, y, lam, mode="train", check=False)
        pop.update_running_stats(res.batch_stats)
        optimizer.step(pop.params, res.grads, lr)
    return step


# --- PyTorch ------------------------------------------------------------------------


def torch_model(sizes):
    layers = []
    for d, m in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(d, m), torch.nn.BatchNorm1d(m, momentum=0.1), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(sizes[-2], sizes[-1]))
    return torch.nn.Sequential(*layers)


def torch_step_fn(sizes, batches):
    model = torch_model(sizes).train()
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tb = [(torch.from_numpy(X), torch.from_numpy(y)) for X, y in batches]

    def step(i):
        X, y = tb[i % len(tb)]
        opt.zero_grad(set_to_none=True)
        cost = torch.nn.functional.cross_entropy(model(X), y)
        cost = cost + LAM * sum((W * W).sum() for W in weights)
        cost.backward()
        opt.step()
    return step


# --- bare matrix products (the "peak" for these shapes) -----------------------------


def products_fn(sizes, n, random):
    """The bare matrix products of one step on arrays from ``random(shape)`` (NumPy or
    torch: ``@`` and ``.T`` read the same in both)."""
    mats = [(l, random((n, d)), random((m, d)), random((n, m)))
            for l, (d, m) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def products(i):
        for l, X, W, G in mats:
            X @ W.T
            G.T @ X
            if l:
                G @ W
    return products


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions (median taken)")
    parser.add_argument("--steps", type=int, help="steps per repetition (default 100; wide 20)")
    parser.add_argument("--cases", type=int, nargs="*", help="case indices to run (default all)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: the core count)")
    parser.add_argument("--population", type=int, metavar="K",
                        help="also time a population of K members against one network")
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"numpy {np.__version__}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, OPENBLAS_NUM_THREADS "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, cpu_count {os.cpu_count()}, "
          f"float32; median of {args.reps} repetitions; load average {load:.1f} at start\n")
    print("| case | batch | klayer ms/step | torch ms/step | klayer/torch | (best reps) "
          "| klayer GFLOP/s | torch GFLOP/s | bare products NumPy GFLOP/s "
          "| bare products torch GFLOP/s | klayer / NumPy products |"
          + (" jax ms/step | klayer/jax |" if peer_jax else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if peer_jax else ""))
    selected = args.cases if args.cases is not None else range(len(CASES))
    ratios = []  # (case, klayer/torch, klayer/jax or None)
    for c in selected:
        name, hidden, n, steps = CASES[c]
        steps = args.steps or steps
        sizes = [INPUT, *hidden, CLASSES]
        batches = [(rng.standard_normal((n, INPUT), dtype=np.float32),
                    rng.integers(0, CLASSES, n)) for _ in range(N_BATCHES)]
        fns = {
            "klayer": klayer_step_fn(sizes, batches),
            "torch": torch_step_fn(sizes, batches),
            **({"jax": peer_jax.step_fn(sizes, batches, LAM, LR)} if peer_jax else {}),
            "np_products": products_fn(sizes, n,
                                       lambda shape: rng.standard_normal(shape, np.float32)),
            "torch_products": products_fn(sizes, n, lambda shape: torch.randn(*shape)),
        }
        for f in fns.values():  # warm-up
            time_per_step(f, 20)
        samples = {k: [] for k in fns}
        for _ in range(args.reps):  # interleaved, so machine noise hits every library alike
            for k, f in fns.items():
                samples[k].append(time_per_step(f, steps))
        t = {k: statistics.median(v) for k, v in samples.items()}
        best = {k: min(v) for k, v in samples.items()}
        gf = step_flops(sizes, n) / 1e9
        print(f"| {name} | {n} | {t['klayer'] * 1e3:.3f} | {t['torch'] * 1e3:.3f} | "
              f"{t['klayer'] / t['torch']:.2f} | {best['klayer'] / best['torch']:.2f} | "
              f"{gf / t['klayer']:.1f} | {gf / t['torch']:.1f} | "
              f"{gf / t['np_products']:.1f} | {gf / t['torch_products']:.1f} | "
              f"{t['np_products'] / t['klayer']:.0%} |"
              + (f" {t['jax'] * 1e3:.3f} | {t['klayer'] / t['jax']:.2f} |" if peer_jax else ""),
              flush=True)
        ratios.append((name.split(" [")[0], t["klayer"] / t["torch"],
                       t["klayer"] / t["jax"] if peer_jax else None))
    print("\nklayer step time / PyTorch's: "
          + ", ".join(f"{case} {r:.2f}×" for case, r, _ in ratios))
    by_jax = ", ".join(f"{case} {r:.2f}×" for case, _, r in ratios) if peer_jax \
        else "(jax not installed)"
    print("klayer step time / JAX's:     " + by_jax)
    if args.population:
        population_table(args, selected, rng)


def population_table(args, selected, rng):
    k = args.population
    print(f"\n| case | batch | one network ms/step | population of {k} ms/step "
          "| per member ms | population / one network |")
    print("|---|---|---|---|---|---|")
    for c in selected:
        name, hidden, n, steps = CASES[c]
        steps = args.steps or steps
        sizes = [INPUT, *hidden, CLASSES]
        batches = [(rng.standard_normal((n, INPUT), dtype=np.float32),
                    rng.integers(0, CLASSES, n)) for _ in range(N_BATCHES)]
        fns = {"one": klayer_step_fn(sizes, batches),
               "population": population_step_fn(sizes, batches, k)}
        for f in fns.values():
            time_per_step(f, 5)
        samples = {key: [] for key in fns}
        for _ in range(args.reps):
            for key, f in fns.items():
                samples[key].append(time_per_step(f, steps))
        t = {key: statistics.median(v) for key, v in samples.items()}
        print(f"| {name} | {n} | {t['one'] * 1e3:.3f} | {t['population'] * 1e3:.3f} | "
              f"{t['population'] / k * 1e3:.3f} | {t['population'] / t['one']:.2f} |",
              flush=True)

if __name__ == "__main__":
    main()
