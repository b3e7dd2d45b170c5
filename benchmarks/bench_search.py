"""Search benchmark: the same λ grid run serially, on 2 worker processes, and on Ray.

A grid of ``--trials`` λ values (3-layer [50, 50] network with batch norm, one cycle of
``--n-s`` steps, ``--subset`` training images) is searched four times with
:func:`klayer.search.run_search`, each into a fresh folder:

- serial: the driver trains each trial (BLAS threads: all cores);
- ``--workers 2``: two worker processes (cores // 2 BLAS threads each);
- Ray: a local 2-CPU Ray instance started here (bound to this machine) and stopped at
  the end; trials get the data through the object store and send their run folders
  back (one BLAS thread each);
- serial again, with the trials trained together as one population.

The first three train one job per trial (``population = false``), so they compare where
trials run; the last shows what training them together saves.

Prints a Markdown table: wall-clock seconds of each search, seconds per trial, the
speed-up against serial, and whether the trials' validation accuracies agree with the
serial ones (they are bit-identical only at equal BLAS threads per trial).

Run:  python benchmarks/bench_search.py [--trials 4] [--n-s 900] [--subset 45000]
      [--data-dir DIR]   (on an otherwise idle machine: timings under load mean little)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import optuna

from klayer.data import ensure_cifar10
from klayer.search import parse_search, run_search


def spec(args, data_dir, population=False):
    return parse_search({
        "hidden_sizes": [50, 50], "batch_norm": True, "n_s": args.n_s, "cycles": 1,
        "subset": args.subset, "data_dir": str(data_dir), "dtype": "float32",
        "search": {"method": "grid", "population": population,
                   "space": {"lam": {"log_uniform": [1e-5, 1e-1], "grid": args.trials}}},
    })


def timed(search, **where):
    with tempfile.TemporaryDirectory(prefix="klayer-bench-search-") as out:
        start = time.perf_counter()
        result = run_search(search, out, **where)
        seconds = time.perf_counter() - start
    accuracies = {r["lam"]: r["val_accuracy"] for r in result.rows if r["state"] == "COMPLETE"}
    return seconds, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="λ grid values (default 4)")
    parser.add_argument("--n-s", type=int, default=900, help="half-cycle steps (default 900)")
    parser.add_argument("--subset", type=int, default=45000,
                        help="training images (default 45,000)")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: KLAYER_DATA)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data_dir = ensure_cifar10(args.data_dir, progress=False)
    search = spec(args, data_dir)  # one job per trial

    rows = [("serial", *timed(search, workers=1)),
            ("--workers 2", *timed(search, workers=2))]
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        rows.append(("Ray, local 2-CPU instance", *timed(search, ray_address="auto")))
    finally:
        ray.shutdown()
    rows.append((f"serial, the {args.trials} trials as one population",
                 *timed(spec(args, data_dir, population=True), workers=1)))

    serial_seconds, serial_accuracies = rows[0][1], rows[0][2]
    print(f"λ grid of {args.trials} trials, 3-layer [50, 50] with batch norm, n_s = "
          f"{args.n_s}, 1 cycle, {args.subset:,} training images\n")
    print("| where trials run | seconds | per trial | speed-up | same accuracies as serial |")
    print("|---|---|---|---|---|")
    for name, seconds, accuracies in rows:
        same = "yes" if accuracies == serial_accuracies else (
            f"no, up to {max(abs(accuracies[k] - serial_accuracies[k]) for k in accuracies):.4f} apart"
            if accuracies.keys() == serial_accuracies.keys() else "different trials finished")
        print(f"| {name} | {seconds:.1f} | {seconds / args.trials:.1f} | "
              f"{serial_seconds / seconds:.2f}× | {same} |")


if __name__ == "__main__":
    main()
