"""float32 against float64: test accuracy of the standard batch-norm runs over seeds.

Trains ``configs/3layer_bn.toml`` and ``configs/9layer_bn.toml`` (the study's protocol:
45,000 / 5,000 / 10,000 images, 2 cycles of n_s = 2250) once per seed and precision, and
prints each run's test accuracy, the mean ± std over the seeds per precision, and the
difference of the means. float32 becomes ``klayer train``'s default only if both
networks' means agree within 0.3 points.

This measures accuracy, not speed: the numbers do not depend on what else the machine
is doing (same seed, same thread count, same results).

Run:  python benchmarks/dtype_accuracy.py --data-dir DIR [--seeds 0,1,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from klayer.config import TrainConfig
from klayer.data import load_data
from klayer.train import train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"3-layer BN": ROOT / "configs/3layer_bn.toml",
           "9-layer BN": ROOT / "configs/9layer_bn.toml"}
DTYPES = ("float32", "float64")


def accuracy(config: TrainConfig, run_dir: Path, data) -> float:
    """Test accuracy of one run, reusing a finished run folder of the same config."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["final"]["test_accuracy"]
    return train(config, data, run_dir).final["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/dtype_accuracy", type=Path)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    results: dict = {}
    for dtype in DTYPES:
        data = None
        for name, path in CONFIGS.items():
            for seed in seeds:
                config = TrainConfig.from_toml(path).replace(
                    dtype=dtype, seed=seed, data_dir=args.data_dir)
                data = data or load_data(config)
                run_dir = args.out / f"{path.stem}-{dtype}-seed{seed}"
                results[name, dtype, seed] = accuracy(config, run_dir, data)
                print(f"{name} {dtype} seed {seed}: {results[name, dtype, seed]:.2%}",
                      flush=True)

    print(f"\n| network | precision | {' | '.join(f'seed {s}' for s in seeds)} "
          f"| mean ± std |")
    print(f"|---|---|{'---|' * len(seeds)}---|")
    means = {}
    for name in CONFIGS:
        for dtype in DTYPES:
            accs = [100 * results[name, dtype, s] for s in seeds]
            means[name, dtype] = statistics.mean(accs)
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {name} | {dtype} | {' | '.join(f'{a:.2f}%' for a in accs)} "
                  f"| {means[name, dtype]:.2f} ± {spread:.2f} |")
    print()
    for name in CONFIGS:
        diff = means[name, "float32"] - means[name, "float64"]
        print(f"{name}: float32 − float64 = {diff:+.2f} points "
              f"({'within' if abs(diff) <= 0.3 else 'outside'} 0.3)")


if __name__ == "__main__":
    main()
