"""Time loading and preprocessing all 60,000 CIFAR-10 images, and their peak memory.

    python benchmarks/bench_data.py [--data-dir DIR] [--repeats 5]

Prints the time to validate the six batch files without decoding them (``check_batch``,
what every ``--subset`` load does for the batches it does not need), to read and validate
all of them (``load_batches``), and of a ``--subset 500`` load; then, per dtype, the
median (and min/max) wall time of ``load_cifar10`` (read and validate six batches,
split, fit the standardiser, standardise train/val/test) and its
CPU time (less sensitive to other processes on a busy machine: compare with the load
average printed first), then the peak traced memory of one call relative to one float
copy of the training split. Fresh memory is slow to touch the first time, so the first
repeat is often the slowest.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import tracemalloc

from klayer.data import batch_files, check_batch, find_data_dir, load_batches, load_cifar10


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (user + system) seconds of ``repeats`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        del result
    return wall, cpu


def report(what: str, times: tuple[list[float], list[float]]) -> None:
    wall, cpu = times
    print(f"{what}: median {statistics.median(wall):.3f} s "
          f"(min {min(wall):.3f}, max {max(wall):.3f}); CPU median {statistics.median(cpu):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    folder = find_data_dir(args.data_dir)
    if folder is None:
        raise SystemExit("CIFAR-10 not found: pass --data-dir or set KLAYER_DATA")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"data: {folder}, {args.repeats} repeats, {os.cpu_count()} CPUs, load average {load}")

    files = list(batch_files(folder).values())
    report("check_batch of the six files (validate without decoding)",
           timed(lambda: [check_batch(path) for path in files], args.repeats))
    report("load_batches (read + validate 60,000 images)",
           timed(lambda: load_batches(folder), args.repeats))
    report("load_cifar10 subset 500, float32 (decode 3 batches, check 3)",
           timed(lambda: load_cifar10(folder, subset=500), args.repeats))
    for dtype in ("float32", "float64"):
        report(f"load_cifar10 full, {dtype} (+ split, fit, standardise)",
               timed(lambda: load_cifar10(folder, dtype=dtype), args.repeats))

    for dtype in ("float32", "float64"):
        tracemalloc.start()
        data = load_cifar10(folder, dtype=dtype)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        train_copy = data.X_train.nbytes
        print(
            f"peak traced memory, {dtype}: {peak / 2**20:.0f} MiB = "
            f"{peak / train_copy:.2f} float copies of the training split "
            f"({train_copy / 2**20:.0f} MiB each; the result itself holds 60,000 images "
            f"= {60000 / len(data.X_train):.2f} copies)"
        )
        del data
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max resident set size of this process: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
