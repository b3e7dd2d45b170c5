"""One configuration over several seeds: per-seed and mean ± std results, wall time and
peak memory, as one Markdown table.

Each seed is trained by ``klayer train --config CONFIG --seed S --out OUT/seedS`` in a
child process of its own, one after the other (so each has the machine to itself), and
measured from the outside like ``/usr/bin/time`` does: wall time, and peak resident
memory from the child's resource usage (``os.wait4``). Those two numbers are kept in
``OUT/seedS/measured.json``; a seed whose run folder already holds a finished run and a
``measured.json`` is not trained again, so the command can be re-run to print the table,
or stopped and continued.

Columns: test accuracy of the saved network (with ``ema``, the averaged weights), test
accuracy with test-time flip averaging, the plain weights' test accuracy (when the
config keeps a weight average), validation and training accuracy, wall time, peak
memory. The last row is the mean ± sample standard deviation over the seeds.

Run (on an idle machine; each seed of configs/best_mlp_v7.toml takes just under an hour
on 2 cores):
    python experiments/seeds.py --config configs/best_mlp_v7.toml --seeds 0 1 2 \\
        --out runs/best_mlp_v7 [--data-dir DIR] [-- extra klayer train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEASURED = "measured.json"


def train_seed(config: str, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """Train one seed in a child process (or continue it with ``--resume`` when its run
    folder holds an unfinished run: the wall time is then this session's and says so);
    return its wall seconds and peak RSS (MiB), also written to ``run_dir/measured.json``."""
    resumed = (run_dir / "config.toml").exists()
    what = ["--resume", str(run_dir)] if resumed else \
        ["--config", config, "--seed", str(seed), "--out", str(run_dir)]
    cmd = [sys.executable, "-m", "klayer.cli", "train", *what, "--quiet", *extra]
    print(f"seed {seed}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"seeds.py: error: seed {seed} failed (exit {code}); its run folder "
                         f"{run_dir} keeps what was done: run the same command again to "
                         "continue it")
    measured = {"wall_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
                "command": shlex.join(cmd), **({"resumed": True} if resumed else {})}
    (run_dir / MEASURED).write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists() and (run_dir / MEASURED).exists()


def row(seed, summary: dict, measured: dict) -> dict:
    final = summary["final"]
    plain = summary.get("final_without_ema", {})
    return {"seed": seed, "test": final["test_accuracy"],
            "tta": final.get("test_accuracy_tta"), "plain": plain.get("test_accuracy"),
            "val": final["val_accuracy"], "train": final["train_accuracy"],
            "minutes": measured["wall_seconds"] / 60, "gib": measured["peak_rss_mib"] / 1024}


def pct(x):
    return "" if x is None else f"{100 * x:.2f}%"


def table(rows: list[dict]) -> str:
    has_plain = any(r["plain"] is not None for r in rows)
    head = ["seed", "test", "test, flip TTA", *(["test, plain weights"] if has_plain else []),
            "validation", "training", "wall time", "peak memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["seed"]), pct(r["test"]), pct(r["tta"]),
                 *([pct(r["plain"])] if has_plain else []), pct(r["val"]), pct(r["train"]),
                 f"{r['minutes']:.1f} min", f"{r['gib']:.2f} GiB"]
        lines.append("| " + " | ".join(cells) + " |")

    def mean_std(key, scale=100, unit="", digits=2):
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return ""
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}{unit}"

    cells = ["**mean ± std**", f"**{mean_std('test')}**", mean_std("tta"),
             *([mean_std("plain")] if has_plain else []), mean_std("val"), mean_std("train"),
             mean_std("minutes", 1, " min", 1), mean_std("gib", 1, " GiB")]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the TOML configuration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="folder for the runs: OUT/seedS")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: KLAYER_DATA, the cache)")
    parser.add_argument("extra", nargs="*", help="more `klayer train` flags, after --")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config} is not a file")
    extra = [*(["--data-dir", args.data_dir] if args.data_dir else []), *args.extra]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        if finished(run_dir):
            measured = json.loads((run_dir / MEASURED).read_text())
            print(f"seed {seed}: reusing {run_dir}", flush=True)
        else:
            measured = train_seed(args.config, seed, run_dir, extra)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(row(seed, summary, measured))
    given = sys.argv[1:] if argv is None else list(argv)
    print(f"\n`{shlex.join(['python', 'experiments/seeds.py', *given])}`\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
