"""Evaluation benchmark: klayer against PyTorch (CPU) on the full training set's size.

Scores, loss and accuracy of 45,000 random 3,072-dim float32 inputs through the 3-layer
[50, 50] batch-norm network in eval mode (moving averages), with the same weights and
statistics in both libraries: klayer's ``Network.evaluate`` against a torch
``nn.Sequential`` in ``eval()`` mode under ``torch.no_grad()``. Prints the median time
of each over several repetitions (interleaved, after a warm-up), their ratio, and the
achieved GFLOP/s (2·n·d·m per matrix product) next to the bare products' rate.

Run:  python benchmarks/bench_eval.py [--reps 7] [--n 45000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from klayer.nn.network import Network

INPUT, HIDDEN, CLASSES, LAM = 3072, [50, 50], 10, 0.005


def torch_copy(net: Network) -> torch.nn.Sequential:
    """The same network in torch: Linear -> BatchNorm1d -> ReLU ... Linear, same numbers."""
    layers = []
    for l in range(1, net.num_layers + 1):
        W, b = net.params[f"W{l}"], net.params[f"b{l}"]
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        lin.weight.data = torch.from_numpy(W.copy())
        lin.bias.data = torch.from_numpy(b.copy())
        layers.append(lin)
        if l < net.num_layers:
            bn = torch.nn.BatchNorm1d(W.shape[0], eps=net.bn_eps)
            bn.weight.data = torch.from_numpy(net.params[f"gamma{l}"].copy())
            bn.bias.data = torch.from_numpy(net.params[f"beta{l}"].copy())
            bn.running_mean = torch.from_numpy(net.buffers[f"running_mean{l}"].copy())
            bn.running_var = torch.from_numpy(net.buffers[f"running_var{l}"].copy())
            layers += [bn, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions (median taken)")
    parser.add_argument("--n", type=int, default=45000, help="number of inputs")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: the core count)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.n, INPUT), dtype=np.float32)
    y = rng.integers(0, CLASSES, args.n)
    net = Network(INPUT, HIDDEN, CLASSES, batch_norm=True, dtype="float32", seed=0)
    for i in range(5):  # a few training steps, so the moving averages are set
        res = net.loss(X[i * 100:(i + 1) * 100], y[i * 100:(i + 1) * 100], LAM)
        net.update_running_stats(res.batch_stats)
        for name, g in res.grads.items():
            net.params[name] -= np.float32(0.01) * g
    model = torch_copy(net)
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def klayer_eval():
        return net.evaluate(X, y, LAM)

    def torch_eval():
        with torch.no_grad():
            scores = model(Xt)
            loss = torch.nn.functional.cross_entropy(scores, yt).item()
            cost = loss + LAM * sum(float((W * W).sum()) for W in weights)
            accuracy = (scores.argmax(dim=1) == yt).float().mean().item()
        return {"loss": loss, "cost": cost, "accuracy": accuracy}

    W1 = net.params["W1"]

    def numpy_product():  # the first layer's product alone: nearly all of the flops
        return X @ W1.T

    ours, theirs = klayer_eval(), torch_eval()
    assert abs(ours["loss"] - theirs["loss"]) < 1e-3 * max(1.0, theirs["loss"]), (ours, theirs)
    assert abs(ours["accuracy"] - theirs["accuracy"]) < 1e-3, (ours, theirs)

    fns = {"klayer": klayer_eval, "torch": torch_eval, "numpy_product": numpy_product}
    samples = {k: [] for k in fns}
    for _ in range(args.reps):  # interleaved, so machine noise hits every library alike
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in samples.items()}
    sizes = [INPUT, *HIDDEN, CLASSES]
    gflop = sum(2 * args.n * d * m for d, m in zip(sizes[:-1], sizes[1:])) / 1e9
    gflop_first = 2 * args.n * INPUT * HIDDEN[0] / 1e9
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"numpy {np.__version__}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, OPENBLAS_NUM_THREADS "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, cpu_count {os.cpu_count()}, "
          f"float32; median of "
          f"{args.reps}; load average {load:.1f}\n")
    print("| work | n | klayer s | torch s | klayer/torch | klayer GFLOP/s | torch GFLOP/s "
          "| NumPy first-layer product GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| evaluate 3-layer [50, 50] BN (scores, loss, accuracy) | {args.n} | "
          f"{t['klayer']:.3f} | {t['torch']:.3f} | {t['klayer'] / t['torch']:.2f} | "
          f"{gflop / t['klayer']:.1f} | {gflop / t['torch']:.1f} | "
          f"{gflop_first / t['numpy_product']:.1f} |")


if __name__ == "__main__":
    main()
