"""``klayer reproduce``: the whole batch-norm study in one command, as REPORT.md."""

from __future__ import annotations

import time
from pathlib import Path

from klayer.nn.checks import DTYPES
from klayer.nn.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="run every section of the batch-norm study and write REPORT.md",
        description="Gradient checks, 3- and 9-layer networks with and without batch norm, "
                    "the λ search and initialisation sensitivity, on real CIFAR-10, written "
                    "to OUT/REPORT.md with figures. Running it again reuses finished runs.",
    )
    p.add_argument("--out", default="reproduction", help="output folder (default reproduction)")
    p.add_argument("--quick", action="store_true",
                   help="the same sections on a 5,000-image subset with short cycles "
                        "(under a minute)")
    p.add_argument("--extended", action="store_true",
                   help="also section vi: batch norm after the ReLU, layer norm, residual "
                        "connections, dropout, augmentation, label smoothing, Adam, and "
                        "PreciseBN / adaptive BN against the moving averages")
    p.add_argument("--workers", type=int, default=2,
                   help="runs trained in parallel (default 2, one per core)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="training precision (gradient checks are always float64)")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: KLAYER_DATA, then the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run)


def run(args) -> int:
    from klayer import runs
    from klayer.data import ensure_cifar10

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder for the reproduction")
    data_dir = str(ensure_cifar10(args.data_dir, download=True, progress=not args.quiet))
    with runs.folder_lock(args.out, "klayer reproduce", kind="reproduction folder"):
        return _reproduce(args, data_dir)


def _reproduce(args, data_dir) -> int:
    from klayer.study import sections as study
    from klayer.study.report import write_report

    budget = study.QUICK if args.quick else study.FULL
    start = time.perf_counter()

    def emit(message):
        if not args.quiet:
            print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    result = study.run_study(args.out, budget, data_dir=data_dir, workers=args.workers,
                             dtype=args.dtype, emit=emit)
    if args.extended:
        result.extended = run_extended_section(result, data_dir, args.dtype, args.workers, emit)
    path = write_report(result)
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


def run_extended_section(result, data_dir, dtype, workers, emit):
    """Section vi on top of the study's 3-layer and 9-layer runs; its time joins the
    study's."""
    from klayer.study import sections as study
    from klayer.study.extended import run_extended

    start = time.perf_counter()
    base = study.base_config(result.budget, data_dir, dtype)
    extended = run_extended(result.out, result.budget, base,
                            {"3-layer": result.depth3, "9-layer": result.depth9}, workers, emit)
    result.seconds["extended"] = time.perf_counter() - start
    return extended
