"""How long klayer takes to refuse a run that cannot fit in memory.

Runs ``klayer train --hidden 10000000`` (hundreds of GiB of weights) and ``klayer search``
over a grid whose largest trial cannot fit, each ``--repeats`` times in a fresh process
from an empty folder, and prints per command the wall time of the whole process
(interpreter start and imports included), its exit status, its one line of error, and
whether it left anything in the folder. The refusal comes from
:func:`klayer.memory.check_fits` before the data is read or a folder is made.

Run:  python benchmarks/bench_refusal.py [--data-dir PATH/cifar-10-batches-py] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HUGE_SEARCH = """[search]
method = "grid"
[search.space.hidden_sizes]
choice = [[8], [10000000]]
"""


def refusal(argv: list, repeats: int, files: dict) -> dict:
    times, statuses, lines, left = [], set(), set(), set()
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="klayer-refusal-") as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "klayer.cli", *argv], cwd=tmp,
                                  capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            statuses.add(done.returncode)
            lines.add(done.stderr.strip())
            left.update(p.name for p in Path(tmp).iterdir() if p.name not in files)
    return {"times": times, "statuses": statuses, "lines": lines, "left": left}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 (default: $KLAYER_DATA or klayer's usual places)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    cases = [
        ("klayer train --hidden 10000000", ["train", "--hidden", "10000000", *data], {}),
        ("klayer search --config huge.toml", ["search", "--config", "huge.toml", *data],
         {"huge.toml": HUGE_SEARCH}),
        ("klayer --version (interpreter and imports only)", ["--version"], {}),
    ]
    print(f"{args.repeats} runs each, {os.cpu_count()} cores\n")
    print("| command | median s | max s | exit | left in the folder | stderr |")
    print("|---|---|---|---|---|---|")
    for name, argv, files in cases:
        r = refusal(argv, args.repeats, files)
        print(f"| `{name}` | {statistics.median(r['times']):.2f} | {max(r['times']):.2f} | "
              f"{', '.join(map(str, sorted(r['statuses'])))} | "
              f"{', '.join(sorted(r['left'])) or 'nothing'} | {sorted(r['lines'])[0]} |")


if __name__ == "__main__":
    main()
