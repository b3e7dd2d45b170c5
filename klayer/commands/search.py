"""``klayer search``: hyper-parameter search over training options (see klayer/search/).

The search comes from ``--config SEARCH.toml`` (a ``[search]`` table and the base training
options) and/or flags, which override it. Running the same command again continues an
interrupted search in its ``--out`` folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

from klayer import memory
from klayer.nn import checks
from klayer.nn.errors import UserError
from klayer.config import add_option_flags, flags_given
from klayer.search import METHODS, OBJECTIVES, SAMPLERS

# klayer train's option flags set the base configuration here too, except these two
# (--batch-norm and --out mean something else in a search)
NOT_TRAINING_FLAGS = ("batch_norm", "out")
MAX_GRID = 100_000  # grid points a search may have unless --max-grid says otherwise


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="hyper-parameter search (grid, random, coarse-to-fine)",
        description="Search over training options with Optuna: a grid, random draws, or a "
                    "coarse grid followed by a fine random round around its best. Trials run "
                    "in this process, in --workers processes or as Ray tasks, in populations "
                    "of trials that differ only in per-member options (one mini-batch stream, "
                    "ordered by the search's data seed, which every trial records, so a "
                    "trial's numbers do not depend on its population; --no-population: one "
                    "by one); the study is kept in DIR/study.db, so running the same command again continues an "
                    "interrupted search. Writes trials.csv, trials.md, best.toml and "
                    "lambda_search.png to DIR.")
    p.add_argument("--config", type=Path, metavar="SEARCH.toml",
                   help="search file: [search] table, [search.space.<option>] entries and "
                        "the base training options")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default searches/<config name>)")
    p.add_argument("--workers", type=_count("workers"), default=1, metavar="N",
                   help="trials in parallel on this machine (default 1); each worker gets "
                        "cores // N BLAS threads. With --ray: trials in flight")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run trials as Ray tasks on the cluster at ADDRESS (HEAD:PORT, 'auto', "
                        "'ray://host:10001'; 'local' starts one here); needs klayer[ray]")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep the FAILed trials of an earlier run of this search instead of "
                        "running them again")
    p.add_argument("--blas-threads", type=_count("blas-threads"), metavar="K",
                   help="BLAS threads per trial (default cores // N; 1 on Ray). Results are "
                        "bit-identical across worker counts only at equal K")
    s = p.add_argument_group("search settings (override the [search] table)")
    s.add_argument("--method", choices=METHODS)
    s.add_argument("--n-trials", type=_count("n-trials"), metavar="N",
                   help="draws of a random search")
    s.add_argument("--fine-trials", type=_count("fine-trials"), metavar="N",
                   help="draws of the fine round of coarse-to-fine")
    s.add_argument("--sampler", choices=SAMPLERS, help="sampler of random draws")
    s.add_argument("--search-seed", type=_count("search-seed", 0), metavar="SEED",
                   help="seed of the samplers")
    s.add_argument("--objective", choices=OBJECTIVES,
                   help="validation accuracy of the final network or the best history point")
    s.add_argument("--lambda-range", type=_range, metavar="LOW,HIGH",
                   help="search λ log-uniformly in [LOW, HIGH], e.g. 1e-5,1e-1")
    s.add_argument("--grid", type=_count("grid", 2), metavar="N",
                   help="number of grid values of λ")
    s.add_argument("--batch-norm", choices=("both", "on", "off"),
                   help="search with and without batch norm (both), or fix it")
    s.add_argument("--no-runs", dest="save_runs", action="store_false", default=None,
                   help="keep no run folder per trial (only the tables)")
    s.add_argument("--no-population", dest="population", action="store_false", default=None,
                   help="train every trial alone instead of in populations of trials that "
                        "differ only in per-member options (λ, η, init, seed, dropout, ...)")
    s.add_argument("--population-size", type=_count("population-size"), metavar="K",
                   help="members of a population at most (default 8; fewer when memory "
                        "is short)")
    t = p.add_argument_group("training options (override the base configuration)")
    add_option_flags(t, skip=NOT_TRAINING_FLAGS, show_defaults=False)
    p.add_argument("--max-grid", type=_count("max-grid"),
                   default=MAX_GRID, metavar="N",
                   help=f"refuse a grid of more than N points (default {MAX_GRID:,})")
    p.add_argument("--quiet", action="store_true",
                   help="plain log lines instead of a progress bar")
    p.set_defaults(handler=run)


def _count(name: str, minimum: int = 1):
    """argparse type: an integer >= minimum (a bad value is a one-line error)."""
    return checks.flag_type(partial(checks.integer, minimum=minimum), name, int)


def _read(path: Path) -> dict:
    from klayer.search import read_search_toml

    if path.is_dir():
        raise UserError(f"search file {path} is a folder; give a .toml file")
    try:
        return read_search_toml(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a TOML file (not UTF-8 text)") from None


def grid_size(doc: dict) -> int:
    """Points of the grid a search document asks for (1 for a random search): the
    product of the number of values of each searched option, counted from the document
    itself, without building the values. Malformed entries count 1 (parse_search
    reports them)."""
    search = doc.get("search")
    if not isinstance(search, dict) or search.get("method", "grid") == "random":
        return 1
    space = search.get("space")
    points = 1
    for entry in (space.values() if isinstance(space, dict) else ()):
        if not isinstance(entry, dict):
            continue
        grid, choices = entry.get("grid"), entry.get("choice")
        if isinstance(grid, int) and not isinstance(grid, bool) and grid > 0:
            points *= grid
        elif isinstance(choices, list) and choices:
            points *= len(choices)
    return points


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH like 1e-5,1e-1, got {text!r}") \
            from None
    return low, high


def run(args) -> int:
    import optuna

    from klayer.data import ensure_cifar10
    from klayer.search import parse_search, run_search

    doc = _document(args, _read(args.config) if args.config else {})
    points = grid_size(doc)
    if points > args.max_grid:  # before the grid's values are built
        raise UserError(f"the grid has {points:,} points, more than --max-grid "
                        f"{args.max_grid:,}; use fewer grid values or a random search")
    spec = parse_search(doc)
    memory.check_fits(_largest_trial(spec), "the largest trial of this search")
    out = args.out or Path("searches") / (args.config.stem if args.config else "search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ensure_cifar10(spec.base.data_dir, progress=not args.quiet)
    names = ", ".join(f"{d.name} {_describe(d)}" for d in spec.space)
    where = f"Ray at {args.ray}" if args.ray else f"{args.workers} worker(s)"
    if spec.population:
        where += f", populations of up to {spec.population_size}"
    print(f"{spec.method} search over {names} in {out} ({where})", flush=True)
    log = _Log(args.quiet)
    start = time.perf_counter()
    try:
        result = run_search(spec, out, workers=args.workers, ray_address=args.ray,
                            blas_threads=args.blas_threads, on_event=log.event,
                            keep_failed=args.keep_failed)
    except KeyboardInterrupt:
        log.close()
        print(f"interrupted: run the same command again to continue the search in {out}",
              file=sys.stderr)
        raise
    finally:
        log.close()
    print()
    print(Path(out, "trials.md").read_text(encoding="utf-8"))
    counts = result.counts()
    retried = f", {counts['retried']} failed and run again" if counts["retried"] else ""
    print(f"{len(result.rows)} trials ({counts['complete']} complete, {counts['failed']} "
          f"failed{retried}) in {time.perf_counter() - start:.0f} s")
    if result.best is None:
        print("no trial finished: no best configuration")
        return 1
    b = result.best
    print(f"best: {b['round']} trial {b['trial']}, validation accuracy {b['val_accuracy']:.4f} "
          f"({spec.objective}); configuration in {Path(out, 'best.toml')}:")
    print(result.best_config.to_toml())
    print("files: " + ", ".join(str(f) for f in result.files))
    return 0


def _document(args, doc: dict) -> dict:
    """The search file's TOML document with the flags applied."""
    doc = dict(doc)
    search = dict(doc.get("search") or {})
    space = dict(search.get("space") or {})
    settings = {"method": args.method, "n_trials": args.n_trials, "fine_trials": args.fine_trials,
                "sampler": args.sampler, "seed": args.search_seed, "objective": args.objective,
                "save_runs": args.save_runs, "population": args.population,
                "population_size": args.population_size}
    search.update({k: v for k, v in settings.items() if v is not None})
    if args.lambda_range is not None:
        space["lam"] = {"log_uniform": list(args.lambda_range)}
    if args.grid is not None:
        if not isinstance(space.get("lam"), dict) or "choice" in space["lam"]:
            raise UserError("--grid sets the number of λ values of a range: give --lambda-range "
                            "or a [search.space.lam] range")
        space["lam"] = {**space["lam"], "grid": args.grid}
    if args.batch_norm == "both":
        space["batch_norm"] = {"choice": [True, False]}
    elif args.batch_norm is not None:
        space.pop("batch_norm", None)
        doc["batch_norm"] = args.batch_norm == "on"
    flags = flags_given(args, skip=NOT_TRAINING_FLAGS)
    clash = sorted(set(flags) & set(space))
    if clash:
        raise UserError(f"{', '.join(clash)}: set by a flag and searched; drop one of the two")
    doc.update(flags)
    doc["search"] = {**search, "space": space}
    return doc


def _describe(d) -> str:
    if d.kind == "choice":
        return "in {" + ", ".join(map(str, d.choices)) + "}"
    grid = f", {d.grid} grid values" if d.grid else ""
    return f"{d.kind} [{d.low:g}, {d.high:g}]{grid}"


class _Log:
    """Progress of a search: a tqdm bar per round on stderr, or (quiet) one line per trial."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.best = quiet, None, None

    def event(self, e) -> None:
        if e.kind == "note":
            print(f"klayer search: {e.note}", file=sys.stderr, flush=True)
            return
        if e.kind == "round":
            self.close()
            if self.quiet:
                print(f"round {e.round}: {e.done} of {e.total} trials already done", flush=True)
            else:
                from tqdm import tqdm

                self.bar = tqdm(total=e.total, initial=e.done, unit="trial", desc=e.round,
                                dynamic_ncols=True, file=sys.stderr)
            return
        row, text = e.row, _trial_line(e.row)
        if row["state"] == "COMPLETE" and (self.best is None or row["val_accuracy"] > self.best):
            self.best = row["val_accuracy"]
        if self.bar is None:
            print(f"[{e.done}/{e.total}] {text}", flush=True)
            return
        if row["state"] != "COMPLETE":
            self.bar.write(text)
        self.bar.update(1)
        if self.best is not None:
            self.bar.set_postfix_str(f"best val acc {self.best:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _trial_line(row: dict) -> str:
    from klayer.search import RESULT_KEYS, format_cell

    params = " ".join(f"{k}={format_cell(k, v)}" for k, v in row.items()
                      if k not in ("round", "trial", "state", *RESULT_KEYS))
    head = f"{row['round']} trial {row['trial']} ({params})"
    if row["state"] != "COMPLETE":
        return f"{head}: {row['state']}: {row['fail_reason']}"
    return (f"{head}: val acc {row['val_accuracy']:.4f}, best epoch {row['best_epoch']:.1f}, "
            f"{row['seconds']:.0f} s")


# Options whose value changes how much memory a trial needs.
_MEMORY_OPTIONS = ("hidden_sizes", "batch_size", "dtype", "subset", "protocol", "n_val",
                   "optimizer")


def _largest_trial(spec) -> dict:
    """The memory estimate of the search's largest trial, before any is run: the base
    configuration with every combination of the searched values of the options above
    (the top of a range)."""
    import itertools

    choices = []
    for dim in spec.space:
        if dim.name not in _MEMORY_OPTIONS:
            continue
        values = (list(dim.choices) if dim.kind == "choice"
                  else [int(dim.high) if dim.kind == "int_uniform" else dim.high])
        choices.append([(dim.name, v) for v in values])
    estimates = []
    for combination in itertools.product(*choices):
        try:
            config = spec.base.replace(**dict(combination))
        except ValueError:
            continue  # an invalid combination: recorded as a failed trial, never run
        estimates.append(memory.estimate(config))
    return max(estimates, key=lambda e: sum(e.values()), default=memory.estimate(spec.base))
