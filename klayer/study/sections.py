"""The batch-norm study as data: which runs, with which configurations.

Each section of the study is a list of named :class:`~klayer.config.TrainConfig` runs
(or, for the gradient check and the λ search, the inputs of those tools). Running the
study (:func:`run_study`) trains every run into ``<out>/runs/<name>-<config hash>/``
and reuses a finished run folder whose configuration matches, or resumes one that has a
checkpoint; a killed reproduction therefore loses at most the runs in progress.

Runs that differ only in per-member options are trained together as populations
(:func:`klayer.train.train_population`): section v's σ runs with batch norm are one population and
those without another, and the λ search trains its trials in populations (the coarse
grid with batch norm, the grid without, the fine search). The single runs of sections ii
and iii and the final run are trained alone.

Two budgets: "full" (the study's protocol: all 45,000 training images, the course
assignment's cycle lengths) and "quick" (a 5,000-image subset and short cycles, the same
sections, under a minute in all: for smoke tests and CI).

Section vi (:mod:`klayer.study.extended`) builds on the runs made here; ``klayer reproduce``
composes the two.
"""

from __future__ import annotations

import hashlib
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from klayer.nn import gradcheck as G
from klayer import runs
from klayer import search
from klayer.config import TrainConfig, toml_value
from klayer.data import cifar_problem

HIDDEN_3 = (50, 50)
HIDDEN_9 = (50, 30, 20, 20, 10, 10, 10, 10)
SIGMAS = (1e-1, 1e-3, 1e-4)

# Gradient-check networks: (batch_norm, hidden sizes), as in the original course report.
GRADCHECK_NETS = [
    (False, (50,)), (False, (50, 50)), (False, (50, 50, 50)),
    (True, (50,)), (True, (50, 50)), (True, HIDDEN_9),
]


@dataclass(frozen=True)
class Budget:
    """How much work each section does."""

    name: str
    subset: int | None  # training images (None: all 45,000)
    n_s: int  # sections ii, iii
    n_s_search: int  # sections iv (coarse and fine) and v
    cycles_final: int
    fine_trials: int
    gradcheck_dims: int
    gradcheck_samples: int
    gradcheck_hidden_9: tuple = HIDDEN_9


FULL = Budget("full", subset=None, n_s=2250, n_s_search=900, cycles_final=3, fine_trials=8,
              gradcheck_dims=20, gradcheck_samples=20)
QUICK = Budget("quick", subset=5000, n_s=200, n_s_search=100, cycles_final=2, fine_trials=3,
               gradcheck_dims=10, gradcheck_samples=12, gradcheck_hidden_9=(12, 10, 10, 10, 10,
                                                                            10, 10, 10))


@dataclass
class Run:
    """One training run of the study and, once run, its results."""

    name: str
    label: str
    config: TrainConfig
    run_dir: Path | None = None
    summary: dict | None = None
    history: list | None = None
    reused: bool = False

    @property
    def test_accuracy(self) -> float:
        return self.summary["final"]["test_accuracy"]

    @property
    def val_accuracy(self) -> float:
        return self.summary["final"]["val_accuracy"]


def base_config(budget: Budget, data_dir=None, dtype="float32", seed=0) -> TrainConfig:
    """The study's training protocol, cut to the budget."""
    return TrainConfig(hidden_sizes=HIDDEN_3, batch_norm=True, lam=0.005, eta_min=1e-5,
                       eta_max=1e-1, n_s=budget.n_s, cycles=2, batch_size=100, seed=seed,
                       dtype=dtype, protocol="full", n_val=5000, subset=budget.subset,
                       data_dir=data_dir)


def depth_runs(base: TrainConfig, hidden, prefix: str) -> list[Run]:
    """Sections ii and iii: one network with and without batch norm."""
    return [Run(f"{prefix}_{'bn' if bn else 'nobn'}",
                f"{len(hidden) + 1}-layer {'with' if bn else 'without'} batch norm",
                base.replace(hidden_sizes=tuple(hidden), batch_norm=bn))
            for bn in (True, False)]


def init_runs(base: TrainConfig, budget: Budget) -> list[Run]:
    """Section v: weights N(0, σ²) for σ in SIGMAS, with and without batch norm."""
    return [Run(f"sigma{sigma:g}_{'bn' if bn else 'nobn'}",
                f"σ = {sigma:g}, {'with' if bn else 'without'} batch norm",
                base.replace(init=sigma, batch_norm=bn, n_s=budget.n_s_search))
            for sigma in SIGMAS for bn in (True, False)]


def init_populations(init: list[Run]) -> list[list[Run]]:
    """Section v's runs as two populations: the σ runs with batch norm, and without
    (a population's members share the architecture; σ is each member's own)."""
    return [[r for r in init if r.config.batch_norm == bn] for bn in (True, False)]


LAMBDA_RANGE = (1e-5, 1e-1)
LAMBDA_GRID = 8


def search_options(base: TrainConfig, budget: Budget) -> dict:
    """Section iv, coarse: the original course report's λ grid (8 values of λ = 10^l, l evenly
    spaced in [-5, -1]) with and without batch norm, 2 cycles, n_s = 2·floor(45000/100)
    in the full budget."""
    options = _search_base(base, budget, ("lam", "batch_norm"))
    options["search"] = {
        "method": "grid", "seed": 0, "objective": "final",
        "space": {"lam": {"log_uniform": list(LAMBDA_RANGE), "grid": LAMBDA_GRID},
                  "batch_norm": {"choice": [True, False]}},
    }
    return options


def fine_search_options(base: TrainConfig, budget: Budget, best_lam: float) -> dict:
    """Section iv, fine: random log-uniform λ within one grid step of the best coarse λ
    with batch norm (the network this study is about), same budget as the coarse grid."""
    step = (math.log10(LAMBDA_RANGE[1]) - math.log10(LAMBDA_RANGE[0])) / (LAMBDA_GRID - 1)
    options = _search_base(base.replace(batch_norm=True), budget, ("lam",))
    options["search"] = {
        "method": "random", "seed": 0, "objective": "final", "n_trials": budget.fine_trials,
        "space": {"lam": {"log_uniform": [best_lam * 10 ** -step, best_lam * 10 ** step]}},
    }
    return options


def _search_base(base: TrainConfig, budget: Budget, searched) -> dict:
    return {k: v for k, v in base.replace(n_s=budget.n_s_search).to_dict().items()
            if v is not None and k not in (*searched, "out")}


def search_workers(trials: int, workers: int) -> int:
    """Workers a search of ``trials`` trials of one kind keeps busy: no more than its
    populations (the other workers train other runs of the study, see run_study)."""
    return max(1, min(workers, math.ceil(trials / search.POPULATION_SIZE)))


# --- running, reusing, resuming --------------------------------------------------------


def run_folder(root: Path, run: Run) -> Path:
    return Path(root) / f"{run.name}-{run.config.config_hash()}"


def finished(run_dir: Path) -> bool:
    """A run folder with a history and the summary of a run that did not diverge."""
    return (run_dir / runs.SUMMARY_FILE).exists() and (run_dir / runs.HISTORY_FILE).exists() \
        and "diverged" not in runs.read_summary(run_dir)


def run_all(study_runs: list, root: Path, executor, emit=lambda msg: None) -> None:
    """Train (or resume) every run not finished yet, in parallel on ``executor`` (see
    :func:`klayer.search.run_trial`), then load each run's summary and history into it.

    study_runs: Runs, or lists of Runs trained together as one population
    (:func:`klayer.train.train_population`: one mini-batch stream; checkpointed in a
    ``.population-*`` folder of ``root`` and resumed from it).
    """
    finish_runs(study_runs, start_runs(study_runs, root, executor, emit))


def start_runs(study_runs: list, root: Path, executor, emit=lambda msg: None) -> list:
    """Submit every run of :func:`run_all` not finished yet to ``executor``; returns what
    :func:`finish_runs` waits for. "finished ..." is emitted as each job ends."""
    root.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[list, Future]] = []
    for item in study_runs:
        todo = []
        for run in item if isinstance(item, list) else [item]:
            run.run_dir = run_folder(root, run)
            run.reused = finished(run.run_dir)
            if run.reused:
                emit(f"reusing {run.name} ({run.run_dir.name})")
            else:
                todo.append(run)
        if not todo:
            continue
        job = {"configs": [r.config.to_dict() for r in todo],
               "run_dirs": [str(r.run_dir) for r in todo], "blas_threads": executor.blas_threads}
        if len(todo) > 1:
            digest = hashlib.sha256("+".join(r.config.config_hash() for r in todo).encode())
            job["checkpoint_dir"] = str(root / f".population-{digest.hexdigest()[:16]}")
        future = executor.submit(job)
        future.add_done_callback(lambda future, todo=todo: _emit_finished(future, todo, emit))
        pending.append((todo, future))
    return pending


def _emit_finished(future: Future, todo: list, emit) -> None:
    """The progress line of a job that ended well (:func:`finish_runs` raises the others)."""
    if future.cancelled() or future.exception() is not None:
        return
    numbers = future.result()
    if all("fail_reason" not in member for member in numbers["members"]):
        emit(f"finished {', '.join(run.name for run in todo)}"
             + (" (one population)" if len(todo) > 1 else ""))


def finish_runs(study_runs: list, pending: list) -> None:
    """Wait for the jobs :func:`start_runs` submitted, then load every run's results."""
    for todo, future in pending:
        numbers = future.result()  # re-raises a failure (DivergenceError, ...) of that job
        for run, member in zip(todo, numbers["members"]):
            if "fail_reason" in member:
                raise ValueError(f"the study's run {run.name} failed: {member['fail_reason']}")
    for item in study_runs:
        for run in item if isinstance(item, list) else [item]:
            run.summary = runs.read_summary(run.run_dir)
            run.history = runs.read_history(run.run_dir / runs.HISTORY_FILE)


# --- gradient check section ---------------------------------------------------------------


@dataclass
class GradcheckTable:
    batch_norm: bool
    hidden: tuple
    rows: list = field(default_factory=list)

    @property
    def title(self) -> str:
        return (f"{len(self.hidden) + 1}-layer network {'with' if self.batch_norm else 'without'}"
                f" batch norm, hidden {list(self.hidden)}")

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def gradcheck_section(budget: Budget, X, y, lam=0.01) -> list[GradcheckTable]:
    tables = []
    for batch_norm, hidden in GRADCHECK_NETS:
        if hidden == HIDDEN_9:
            hidden = budget.gradcheck_hidden_9
        table = GradcheckTable(batch_norm, tuple(hidden))
        table.rows = G.check_gradients_for(list(hidden), X, y, batch_norm=batch_norm, lam=lam,
                                           seed=0)
        tables.append(table)
    return tables


# --- the whole study ---------------------------------------------------------------------------


@dataclass
class StudyResult:
    budget: Budget
    gradcheck: list
    gradcheck_lam: float
    depth3: list
    depth9: list
    search: search.SearchResult  # of the coarse grid
    fine: search.SearchResult  # ... and of the fine search
    final: Run
    init: list
    # "gradcheck": wall seconds; "runs" (ii, iii, v) and "search" (iv): worker seconds,
    # the sum of their jobs' times (they share the workers, see run_study)
    seconds: dict
    out: Path
    extended: object = None  # section vi (klayer.study.extended.ExtendedResult), added by its caller
    workers: int = 1
    wall: float = 0.0  # wall-clock seconds of sections ii to v together


def run_study(out, budget: Budget = FULL, data_dir=None, workers: int = 1, dtype="float32",
              emit=lambda msg: None) -> StudyResult:
    """Run (or reuse) sections i to v of the study into ``out``; returns the numbers.

    Sections ii to v share one executor of ``workers`` processes, in two lanes
    (:class:`~klayer.search.executors.Lanes`). The critical path, section iv's coarse λ
    search, then its fine search, then the final run (each needs the one before), goes
    first, on as many workers as it has jobs to run at once (:func:`search_workers`: the
    two populations of the coarse grid, then one job); the runs of sections ii, iii and
    v, which need nothing, fill the other workers. With ``workers=1`` everything runs one
    job at a time, the critical path first. Every job gets the executor's BLAS threads
    (cores // workers).
    """
    import optuna

    from klayer.search.executors import Lanes

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out)
    root = out / "runs"
    base = base_config(budget, data_dir, dtype)

    t0 = time.perf_counter()
    emit("section i: gradient checks")
    X, y = cifar_problem(budget.gradcheck_dims, budget.gradcheck_samples, data_dir)
    lam = 0.01
    tables = gradcheck_section(budget, X, y, lam)
    seconds = {"gradcheck": time.perf_counter() - t0}

    t0 = time.perf_counter()
    executor = search.make_executor(workers)
    lanes = Lanes(executor)
    lanes.reserve(search_workers(2 * LAMBDA_GRID, workers))  # before any other job
    try:
        emit(f"sections ii to v on {workers} worker(s): the λ search and final run first, "
             "the 3-layer, 9-layer and initialisation runs beside them")
        depth3 = depth_runs(base, HIDDEN_3, "3layer")
        depth9 = depth_runs(base, HIDDEN_9, "9layer")
        init = init_runs(base, budget)
        independent = depth3 + depth9 + init_populations(init)
        pending = start_runs(independent, root, lanes.rest, emit)

        emit("section iv: coarse λ grid with and without batch norm")
        coarse = search.run_search(search.parse_search(search_options(base, budget)),
                                   out / "search", executor=lanes.critical)
        best_bn = search.best_row([row for row in coarse.rows if row["batch_norm"]])
        if best_bn is None:
            raise ValueError(f"no coarse trial with batch norm finished; see "
                             f"{out}/search/trials.md")
        lanes.reserve(search_workers(budget.fine_trials, workers))
        emit("section iv: fine λ search with batch norm")
        fine = search.run_search(
            search.parse_search(fine_search_options(base, budget, best_bn["lam"])),
            out / "search-fine", executor=lanes.critical)
        best_row = search.best_row([best_bn, *fine.rows])
        best = TrainConfig(**{**base.to_dict(), "lam": best_row["lam"], "batch_norm": True})
        final = Run("final", f"final: λ = {best.lam:.3g}, {budget.cycles_final} cycles",
                    best.replace(cycles=budget.cycles_final, n_s=budget.n_s))
        lanes.reserve(1)
        emit(f"section iv: final run, λ = {best.lam:.3g}")
        run_all([final], root, lanes.critical, emit)
        lanes.reserve(0)  # every worker to what is left of sections ii, iii, v
        finish_runs(independent, pending)
    finally:
        lanes.close()
        executor.close()
    seconds.update(runs=lanes.rest.seconds, search=lanes.critical.seconds)
    return StudyResult(budget, tables, lam, depth3, depth9, coarse, fine, final, init,
                       seconds, out, workers=workers, wall=time.perf_counter() - t0)


def config_lines(config: TrainConfig, keys=None) -> str:
    """``key = value`` lines of a config's options that matter to a reader."""
    keys = keys or ["hidden_sizes", "batch_norm", "init", "lam", "eta_min", "eta_max", "n_s",
                    "cycles", "batch_size", "dtype", "seed", "protocol", "n_val", "subset"]
    values = config.to_dict()
    return "\n".join(f"{k} = {toml_value(values[k])}" for k in keys if values.get(k) is not None)
