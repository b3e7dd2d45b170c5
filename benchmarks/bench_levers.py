"""Cost of each lever per mini-batch of the best MLP (batch 256, float32, 3,072 inputs).

Times, in the same run: the training step of 3072 → 1024 → 512 → 256 → 10 with batch
norm and dropout 0.2 (the reference), the augmentations (flips + translations ±3 with
mean, reflect and edge padding), MixUp, CutMix with their soft targets, the ZCA (3072 ×
3072) and PCA (3072 × 512) products of one batch, one EMA update of the network's
weights, the momentum update with the weights' average moved after it and riding it
(as the training loop moves it: in the same pass over each weight), and the extra cost
of test-time flip averaging on 10,000 test images.
Random data: the costs do not depend on the values (the whitening matrices are random
too; fitting one is timed by experiments/levers.py on the real data).

Run:  python benchmarks/bench_levers.py [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from klayer.levers.augment import Augmentation, Mixing, soft_targets
from klayer.levers.ema import EMA
from klayer.nn.network import Network
from klayer.nn.optim import Momentum
from klayer.levers.tta import flip_average_scores
from klayer.levers.whiten import Whitening

B, D, HIDDEN = 256, 3072, [1024, 512, 256]


def median_ms(fn, reps, inner=1):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--test-images", type=int, default=10000)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((B, D)).astype(np.float32)
    y = rng.integers(0, 10, B)
    net = Network(D, HIDDEN, 10, batch_norm=True, dtype="float32", dropout=0.2)
    optimizer = Momentum(0.9)
    draws = np.random.default_rng(1)

    def step():
        masks = net.dropout_masks(B, draws)
        result = net.loss(X, y, 5e-4, check=False, masks=masks)
        optimizer.step(net.params, result.grads, 1e-3)
        net.update_running_stats(result.batch_stats)

    step()
    zca = Whitening("zca", 1e-2, None, np.zeros(D), rng.standard_normal((D, D)) / 55,
                    np.ones(D))
    pca = Whitening("pca", 1e-2, 512, np.zeros(D), rng.standard_normal((D, 512)) / 55,
                    np.ones(D))
    ema = EMA(0.999)
    ema.update(net.params)
    X_test = rng.standard_normal((args.test_images, D)).astype(np.float32)
    cases = [("training step (reference)", step)]
    for mode in ("mean", "reflect", "edge"):
        aug = Augmentation(flip=True, translate=3, pad_mode=mode)
        cases.append((f"flips + translations ±3 ({mode} padding)",
                      lambda aug=aug: aug(X, draws)))
    for name, mixing in (("MixUp α=0.2", Mixing(mixup=0.2)), ("CutMix α=1", Mixing(cutmix=1.0))):
        def mix(mixing=mixing):
            _, y_a, y_b, weights = mixing(X, y, draws)
            soft_targets(y_a, y_b, weights, 10, dtype="float32")
        cases.append((f"{name} + soft targets", mix))
    cases += [("ZCA product (256 × 3072 · 3072 × 3072)", lambda: zca.transform(X)),
              ("PCA product (256 × 3072 · 3072 × 512)", lambda: pca.transform(X)),
              ("EMA update of all weights", lambda: ema.update(net.params))]
    grads = net.loss(X, y, 5e-4, check=False, l2_gradient=False).grads
    l2 = net.l2_term(5e-4)

    def update_then_average():
        optimizer.step(net.params, grads, 1e-3, l2=l2)
        ema.update(net.params)

    def update_with_average():
        optimizer.step(net.params, grads, 1e-3, l2=l2, average=ema.riding())

    cases += [("momentum update (with the L2 term), then the EMA update", update_then_average),
              ("momentum update with the EMA update riding it", update_with_average)]
    load = os.getloadavg()[0]
    print(f"numpy {np.__version__}, cpu_count {os.cpu_count()}, OPENBLAS_NUM_THREADS "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, float32, batch {B}; median of "
          f"{args.reps}; load average {load:.1f} at start\n")
    print("| work per mini-batch | ms |\n|---|---|")
    for name, fn in cases:
        print(f"| {name} | {median_ms(fn, args.reps):.2f} |", flush=True)
    plain = median_ms(lambda: net.scores(X_test), max(1, args.reps // 2))
    tta = median_ms(lambda: flip_average_scores(net, X_test), max(1, args.reps // 2))
    print(f"\nevaluation of {args.test_images} test images: plain {plain:.0f} ms, "
          f"with flip averaging {tta:.0f} ms")


if __name__ == "__main__":
    main()
