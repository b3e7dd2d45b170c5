"""Hyper-parameter search over training options, built on Optuna.

A search is a base :class:`~klayer.config.TrainConfig` and a *space*: the options to
vary, each a :class:`Dimension` (a log-uniform, uniform or integer range, optionally
with a grid of N values, or a list of choices). Methods:

- "grid": every combination of the grid values (``optuna.samplers.GridSampler``);
- "random": ``n_trials`` draws (seeded ``RandomSampler``, or ``TPESampler``);
- "coarse-to-fine": a grid, then ``fine_trials`` random draws in a second study whose
  ranges are narrowed to ± ``fine_width`` grid steps around the best coarse trial
  (choices fixed at the best one).

A search file is a training config (flat ``key = value`` options, the base) with a
``[search]`` table::

    n_s = 900
    [search]
    method = "grid"              # or "random" (n_trials = ...), "coarse-to-fine"
    [search.space.lam]
    log_uniform = [1e-5, 1e-1]   # or uniform = [a, b], int_uniform = [a, b]
    grid = 8                     # 10^l, l evenly spaced in [-5, -1]
    [search.space.batch_norm]
    choice = [true, false]

The driver process keeps the studies (``study.db``, SQLite, in the output folder) and
uses Optuna's ask-and-tell interface; trials train with :func:`klayer.train.train` in
the driver (one worker), in a pool of worker processes (``workers``), or as Ray tasks
(``ray_address``). Each process loads the data once. A trial's seed is a hash of its
parameters and the base seed, so results do not depend on how trials are scheduled
(bit for bit at equal BLAS threads per trial: see :func:`make_executor`).
The objective is the validation accuracy of the final network ("final", default) or the
best one over the history points ("best"); both are kept as user attributes.

Running the same search again continues it: finished trials are kept, trials left
RUNNING by a killed process are marked FAIL ("interrupted") and queued again with
Optuna's ``RetryHeartbeatStaleTrialCallback``. A trial that diverges or has a bad
parameter is recorded as FAIL with its reason, and the search goes on.

Files in the output folder: ``study.db``, ``runs/<round>-<trial>/`` (one run folder per
trial), ``trials.csv``, ``trials.md``, ``best.toml`` (loadable by ``klayer train
--config``) and ``lambda_search.png`` when λ is searched.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
import tomllib
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from klayer.config import TrainConfig

METHODS = ("grid", "random", "coarse-to-fine")
SAMPLERS = ("random", "tpe")
OBJECTIVES = ("final", "best")
KINDS = ("log_uniform", "uniform", "int_uniform", "choice")
NOT_SEARCHABLE = ("out", "data_dir")  # where things are, not what is computed
SEARCH_KEYS = ("method", "n_trials", "seed", "sampler", "objective", "fine_trials",
               "fine_width", "save_runs", "space")
STUDY_FILE = "study.db"
# a table row: round, trial, state, the searched options, then these
RESULT_KEYS = ("seed", "val_accuracy", "val_accuracy_best", "val_accuracy_final", "best_epoch",
               "test_accuracy", "seconds", "run_dir", "fail_reason")
INTERRUPTED = "interrupted: the search stopped while this trial ran; queued again"


# --- the search space -------------------------------------------------------------------


def log_grid(low: float, high: float, n: int) -> list[float]:
    """10^l for n values of l evenly spaced in [log10 low, log10 high]."""
    return [float(10.0 ** l) for l in np.linspace(math.log10(low), math.log10(high), n)]


def _encode(value):
    """A choice as Optuna can store it: scalars as they are, lists as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


@dataclass(frozen=True)
class Dimension:
    """One searched training option.

    kind "log_uniform" / "uniform" / "int_uniform": a range [low, high], sampled
    log-uniformly, uniformly or as integers; with ``grid`` = N a grid search uses N
    evenly spaced values (in log10 for log_uniform). kind "choice": the ``choices``
    (any TOML values, e.g. [true, false] or lists of hidden sizes).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    grid: int | None = None
    choices: tuple = ()

    def values(self) -> list:
        """The grid values, as Optuna stores them (see :meth:`decode`)."""
        if self.kind == "choice":
            return [_encode(c) for c in self.choices]
        if self.grid is None:
            raise ValueError(f"search.space.{self.name}: a grid search needs `grid = N` "
                             "for a range")
        if self.kind == "log_uniform":
            return log_grid(self.low, self.high, self.grid)
        points = np.linspace(self.low, self.high, self.grid)
        if self.kind == "int_uniform":
            return sorted({int(round(p)) for p in points})
        return [float(p) for p in points]

    def suggest(self, trial):
        """Ask the trial's sampler for this option (the stored, encoded value)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.values())
        if self.kind == "int_uniform":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high,
                                   log=self.kind == "log_uniform")

    def decode(self, value):
        """A stored value as the TrainConfig option."""
        if self.kind == "choice":
            for choice in self.choices:
                if _encode(choice) == value:
                    return choice
            raise ValueError(f"search.space.{self.name}: {value!r} is not one of the choices")
        return int(value) if self.kind == "int_uniform" else float(value)

    def narrowed(self, best, width: float) -> "Dimension":
        """The fine-round dimension: ± width grid steps around ``best`` (a stored value),
        clipped to the range, sampled without a grid; a choice keeps only ``best``."""
        if self.kind == "choice":
            return Dimension(self.name, "choice", choices=(self.decode(best),))
        if self.grid is None:
            raise ValueError(f"search.space.{self.name}: coarse-to-fine needs `grid = N`")
        if self.kind == "log_uniform":
            step = width * (math.log10(self.high) - math.log10(self.low)) / (self.grid - 1)
            low, high = best * 10.0 ** -step, best * 10.0 ** step
        else:
            step = width * (self.high - self.low) / (self.grid - 1)
            low, high = best - step, best + step
        low, high = max(low, self.low), min(high, self.high)
        if self.kind == "int_uniform":
            low, high = math.ceil(low), math.floor(high)
            if low >= high:
                return Dimension(self.name, "choice", choices=(int(best),))
        return Dimension(self.name, self.kind, low, high)

    def describe(self) -> dict:
        """The dimension as its TOML entry."""
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        entry = {self.kind: [self.low, self.high]}
        if self.grid is not None:
            entry["grid"] = self.grid
        return entry


def parse_dimension(name: str, entry) -> Dimension:
    """A Dimension from its ``[search.space.<name>]`` entry, checked."""
    where = f"search.space.{name}"
    searchable = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SEARCHABLE]
    if name not in searchable:
        raise ValueError(f"{where}: not a searchable training option; choose from "
                         f"{', '.join(searchable)}")
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a table like {{ log_uniform = [1e-5, 1e-1], grid = 8 }}")
    kinds = [k for k in KINDS if k in entry]
    unknown = sorted(set(entry) - set(KINDS) - {"grid"})
    if len(kinds) != 1 or unknown:
        raise ValueError(f"{where} needs exactly one of {', '.join(KINDS)} (and optionally "
                         f"grid = N), got keys {', '.join(sorted(entry))}")
    kind, value, grid = kinds[0], entry[kinds[0]], entry.get("grid")
    if kind == "choice":
        if grid is not None:
            raise ValueError(f"{where}: grid applies to ranges; a choice is searched in full")
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where}: choice must be a non-empty list")
        return Dimension(name, kind, choices=tuple(value))
    numbers = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if not numbers or not value[0] < value[1]:
        raise ValueError(f"{where}: {kind} must be [low, high] with low < high, got {value!r}")
    if kind == "log_uniform" and value[0] <= 0:
        raise ValueError(f"{where}: log_uniform needs low > 0, got {value[0]!r}")
    if kind == "int_uniform" and not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}: int_uniform needs integer bounds, got {value!r}")
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 2):
        raise ValueError(f"{where}: grid must be an integer >= 2, got {grid!r}")
    low, high = (int(v) for v in value) if kind == "int_uniform" else (float(v) for v in value)
    return Dimension(name, kind, low, high, grid)


@dataclass(frozen=True)
class SearchSpec:
    """A whole search: base config, space, method and its settings (see the module doc).

    n_trials: draws of a random search (a grid runs every point). seed: of the samplers
    (the training seeds come from :func:`trial_seed`). sampler: "random" or "tpe" for
    random draws. fine_trials, fine_width: the second round of coarse-to-fine.
    save_runs: keep a run folder per trial (model, history, figures).
    """

    base: TrainConfig
    space: tuple
    method: str = "grid"
    n_trials: int | None = None
    seed: int = 0
    sampler: str = "random"
    objective: str = "final"
    fine_trials: int = 8
    fine_width: float = 1.0
    save_runs: bool = True

    def __post_init__(self):
        object.__setattr__(self, "space", tuple(self.space))
        names = [d.name for d in self.space]
        if not names:
            raise ValueError("search: the space is empty; add [search.space.<option>] entries")
        if len(set(names)) != len(names):
            raise ValueError(f"search: an option appears twice in the space: {names}")
        for key, allowed in (("method", METHODS), ("sampler", SAMPLERS),
                             ("objective", OBJECTIVES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"search: {key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, key)!r}")
        for key, minimum in (("seed", 0), ("fine_trials", 1)):
            _check_int(getattr(self, key), key, minimum)
        if self.n_trials is not None:
            _check_int(self.n_trials, "n_trials", 1)
        if self.method == "random" and self.n_trials is None:
            raise ValueError("search: method = \"random\" needs n_trials")
        if self.method != "random":
            for d in self.space:
                d.values()  # a grid needs grid = N on every range
        if not (isinstance(self.fine_width, (int, float)) and self.fine_width > 0):
            raise ValueError(f"search: fine_width must be > 0, got {self.fine_width!r}")
        if not isinstance(self.save_runs, bool):
            raise ValueError(f"search: save_runs must be true or false, got {self.save_runs!r}")

    def first_round(self) -> "Round":
        """The grid or random round (named "search": a grid search continued as
        coarse-to-fine in the same folder keeps its trials)."""
        if self.method == "random":
            return Round("search", self.space, "random", self.n_trials)
        return Round("search", self.space, "grid", None)

    def fine_round(self, best_params: dict) -> "Round":
        """The second round of coarse-to-fine around the best coarse trial's params."""
        space = tuple(d.narrowed(best_params[d.name], self.fine_width) for d in self.space)
        return Round("fine", space, "random", self.fine_trials)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"search: {name} must be an integer >= {minimum}, got {value!r}")


def parse_search(options: dict) -> SearchSpec:
    """A SearchSpec from a TOML document: the ``[search]`` table (with its ``space``)
    and, around it, the base TrainConfig's options."""
    options = dict(options)
    table = options.pop("search", None)
    if not isinstance(table, dict):
        raise ValueError("a search file needs a [search] table (method, n_trials, seed, ...) "
                         "and [search.space.<option>] entries")
    unknown = sorted(set(table) - set(SEARCH_KEYS))
    if unknown:
        raise ValueError(f"unknown [search] key(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(SEARCH_KEYS)}")
    table = dict(table)
    space = table.pop("space", {})
    if not isinstance(space, dict):
        raise ValueError("search.space must be a table of options")
    dims = [parse_dimension(name, entry) for name, entry in space.items()]
    return SearchSpec(base=TrainConfig.from_dict(options), space=dims, **table)


def read_search_toml(path) -> dict:
    """The TOML document of a search file (errors name the file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"search file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def load_search(path) -> SearchSpec:
    """A SearchSpec from a TOML file (see :func:`parse_search`)."""
    try:
        return parse_search(read_search_toml(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Round:
    """One study of a search: its name in the storage, space, sampling and size."""

    name: str
    space: tuple
    method: str  # "grid" or "random"
    n_trials: int | None


def trial_seed(base_seed: int, options: dict) -> int:
    """The training seed of a trial: a hash of the base seed and its options (a searched
    ``seed`` is used as it is), the same whichever worker runs it and when."""
    if "seed" in options:
        return int(options["seed"])
    text = json.dumps({"base_seed": base_seed, **options}, sort_keys=True, default=list)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


# --- running one trial (in any process) ---------------------------------------------------

_DATA: dict = {}  # this process's datasets, keyed by the data options


def dataset_for(config: TrainConfig):
    """The data ``config`` trains on, loaded once per process."""
    from klayer.data import load_data

    key = (config.data_dir, config.protocol, config.n_val, config.subset, config.dtype)
    if key not in _DATA:
        _DATA[key] = load_data(config, download=False)
    return _DATA[key]


def run_trial(job: dict) -> dict:
    """Train ``job["config"]`` (a TrainConfig dict) into ``job["run_dir"]`` (or none) with
    at most ``job["blas_threads"]`` BLAS threads; return the trial's numbers.

    Raises what training raises (DivergenceError, ValueError): the driver records it.
    """
    from threadpoolctl import threadpool_limits

    from klayer.train import train

    config = TrainConfig.from_dict(job["config"])
    with threadpool_limits(limits=job["blas_threads"], user_api="blas"):
        data = dataset_for(config)
        start = time.perf_counter()
        result = train(config, data, job["run_dir"])
    return {
        "val_accuracy_final": float(result.final["val_accuracy"]),
        "val_accuracy_best": float(result.best_val_accuracy),
        "best_epoch": float(result.best_epoch),
        "test_accuracy": result.final.get("test_accuracy"),
        "seconds": time.perf_counter() - start,
    }


# --- executors: where trials run -----------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class InProcessExecutor:
    """One worker: the driver trains each trial itself, when it is submitted."""

    capacity = 1

    def __init__(self, blas_threads: int | None = None):
        self.blas_threads = blas_threads or available_cores()

    def submit(self, job: dict, fn=None) -> Future:
        future = Future()
        try:
            future.set_result((fn or run_trial)(job))
        except Exception as exc:  # recorded as a failed trial by the driver
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass


def _worker_start(parent: int) -> None:
    """In a pool worker: leave Ctrl-C to the driver, and exit if the driver dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class PoolExecutor:
    """N worker processes ("spawn", started at the first trial), each limited to
    cores // N BLAS threads (or ``blas_threads``)."""

    def __init__(self, workers: int, blas_threads: int | None = None):
        self.capacity = workers
        self.blas_threads = blas_threads or max(1, available_cores() // workers)
        self.pool = None

    def submit(self, job: dict, fn=None) -> Future:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.capacity, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start, initargs=(os.getpid(),))
        return self.pool.submit(fn or run_trial, job)

    def close(self) -> None:
        if self.pool is None:
            return
        # Running trials are not waited for (an interrupted search reruns them); the
        # executor has no public way to stop its workers before Python 3.14.
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray, an optional extra: pip install 'klayer[ray]'") from None
    return ray


class RayExecutor:
    """Trials as Ray tasks on a Ray cluster, each reserving as many CPUs as its BLAS
    threads (default 1).

    address: of an existing cluster ("auto", "ray://host:10001", ...) or "local" to start
    one here; connected at the first trial. If this process is already connected to Ray,
    that connection is used. capacity: trials in flight (default: the cluster's CPUs).
    """

    def __init__(self, address: str, capacity: int | None = None,
                 blas_threads: int | None = None):
        self.ray = _import_ray()
        self.address, self.task, self.started = address, None, False
        self._capacity = capacity
        self.blas_threads = blas_threads or 1

    def _connect(self) -> None:
        if self.task is not None:
            return
        if not self.ray.is_initialized():
            self.ray.init(address=None if self.address == "local" else self.address,
                          include_dashboard=False, logging_level="warning")
            self.started = True
        self.task = self.ray.remote(num_cpus=self.blas_threads)(run_trial)

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._connect()
            cpus = int(self.ray.cluster_resources().get("CPU", 1))
            self._capacity = max(1, cpus // self.blas_threads)
        return self._capacity

    def submit(self, job: dict, fn=None) -> Future:
        self._connect()
        task = self.task if fn is None else self.ray.remote(num_cpus=self.blas_threads)(fn)
        return task.remote(job).future()

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(workers: int = 1, ray_address: str | None = None,
                  blas_threads: int | None = None):
    """Where trials run: Ray tasks, a process pool, or the driver itself.

    blas_threads: per trial (default: cores // workers; 1 on Ray). Training results are
    bit-identical only at equal BLAS threads: OpenBLAS sums in another order with more
    threads, and over thousands of float32 steps this moves accuracies by ~0.5%.
    """
    _check_int(workers, "workers", 1)
    if blas_threads is not None:
        _check_int(blas_threads, "blas_threads", 1)
    if ray_address:
        return RayExecutor(ray_address, workers if workers > 1 else None, blas_threads)
    if workers > 1:
        return PoolExecutor(workers, blas_threads)
    return InProcessExecutor(blas_threads)


# --- studies ---------------------------------------------------------------------------------


def storage_url(out) -> str:
    return f"sqlite:///{Path(out).resolve() / STUDY_FILE}"


def open_storage(out) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(storage_url(out),
                                      engine_kwargs={"connect_args": {"timeout": 60}})


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler for the ask-and-tell driver, which counts the grid points itself:
    ``Study.stop`` (what GridSampler calls when the grid is done) only works inside
    ``Study.optimize``."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _grid_points(rnd: Round) -> list[dict]:
    """Every point of a grid round, as Optuna stores the parameters."""
    names = [d.name for d in rnd.space]
    combos = itertools.product(*(d.values() for d in rnd.space))
    return [dict(zip(names, combo)) for combo in combos]


def _sampler(rnd: Round, spec: SearchSpec, draw: int):
    """The sampler for the next trial; random draws are reseeded per draw so draw k
    has the same parameters however often the search was interrupted."""
    if rnd.method == "grid":
        return _GridSampler({d.name: d.values() for d in rnd.space}, seed=spec.seed)
    seed = int(np.random.SeedSequence([spec.seed, draw]).generate_state(1)[0])
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _study_meta(rnd: Round, spec: SearchSpec) -> dict:
    """What a study is a search of; resuming with something else is an error."""
    return {"base": spec.base.config_hash(), "method": rnd.method, "seed": spec.seed,
            "sampler": spec.sampler if rnd.method == "random" else None,
            "space": {d.name: d.describe() for d in rnd.space}, "objective": spec.objective}


def open_study(storage, rnd: Round, spec: SearchSpec) -> optuna.Study:
    """The round's study (created or loaded); check that it is the same search."""
    study = optuna.create_study(storage=storage, study_name=rnd.name, direction="maximize",
                                load_if_exists=True)
    meta = json.loads(json.dumps(_study_meta(rnd, spec)))  # as stored
    saved = study.user_attrs.get("klayer_search")
    if saved is None:
        study.set_user_attr("klayer_search", meta)
    elif saved != meta:
        changed = sorted(k for k in meta if saved.get(k) != meta.get(k))
        raise ValueError(f"the study '{rnd.name}' in {STUDY_FILE} belongs to another search "
                         f"(different {', '.join(changed)}); use another --out folder")
    return study


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a stopped search as FAIL and queue them again with
    Optuna's RetryHeartbeatStaleTrialCallback (same parameters, and for a grid the same
    grid point). Call it only while no other process runs this study. Returns their numbers.
    """
    storage = study._storage
    retry = _retry_callback()
    stale = study.get_trials(deepcopy=True, states=(TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        if trial.params or "grid_id" in trial.system_attrs:
            retry(study, trial)  # copies the snapshot taken before the reason was set
    return [t.number for t in stale]


def _retry_callback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback()


def _counts(trial) -> bool:
    """Whether a trial counts towards the round's size (interrupted ones are redone)."""
    return trial.user_attrs.get("fail_reason") != INTERRUPTED


def _to_ask(study: optuna.Study, rnd: Round) -> int:
    """New trials still to ask for (besides the queued ones)."""
    trials = [t for t in study.get_trials(deepcopy=False) if _counts(t)]
    if rnd.method == "random":
        return max(0, rnd.n_trials - len(trials))
    covered = {json.dumps(t.params, sort_keys=True) for t in trials}
    return sum(json.dumps(p, sort_keys=True) not in covered for p in _grid_points(rnd))


# --- the driver ----------------------------------------------------------------------------


@dataclass
class SearchEvent:
    """What ``on_event`` receives: kind "round" when a round starts (``done`` of
    ``total`` trials already finished), "trial" when a trial finishes (``row``)."""

    kind: str
    round: str
    done: int
    total: int
    row: dict | None = None


@dataclass
class SearchResult:
    """The rows of every trial (see :func:`trial_row`), the best row and its config."""

    out: Path
    rows: list
    best: dict | None
    best_config: TrainConfig | None
    files: list


@contextmanager
def _search_lock(out: Path):
    """Only one search runs in a folder at a time (its RUNNING trials are its own)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(out / ".search.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another klayer search is running in {out}") from None
        yield


def run_search(spec: SearchSpec, out, workers: int = 1, ray_address: str | None = None,
               blas_threads: int | None = None, on_event=None) -> SearchResult:
    """Run (or continue) ``spec`` in folder ``out``; write the tables, best.toml and the
    figure; return every trial. ``on_event`` receives :class:`SearchEvent` objects.
    workers, ray_address, blas_threads: where trials run (see :func:`make_executor`)."""
    from klayer.data import ensure_cifar10

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda event: None)
    with _search_lock(out):
        storage = open_storage(out)
        rounds = [spec.first_round()]
        studies = [open_study(storage, rounds[0], spec)]
        ensure_cifar10(spec.base.data_dir, progress=False)  # once, before workers start
        executor = make_executor(workers, ray_address, blas_threads)
        try:
            _run_round(studies[0], rounds[0], spec, out, executor, emit)
            if spec.method == "coarse-to-fine":
                best = _best_trial(studies[0])
                if best is None:
                    raise ValueError("no trial of the first round finished; see trials.md")
                rounds.append(spec.fine_round(best.params))
                studies.append(open_study(storage, rounds[1], spec))
                _run_round(studies[1], rounds[1], spec, out, executor, emit)
        finally:  # the tables also after an interruption or an error
            executor.close()
            rows = [trial_row(t, rnd, spec) for rnd, study in zip(rounds, studies)
                    for t in study.get_trials(deepcopy=False)]
            files = write_tables(out, rows, spec) if rows else []
        best = best_row(rows)
        best_config = None if best is None else config_of(best, spec)
        files += write_results(out, rows, spec, best, best_config)
    return SearchResult(out, rows, best, best_config, files)


def _run_round(study, rnd: Round, spec: SearchSpec, out: Path, executor, emit) -> None:
    """Ask for the missing trials of a round, run them on ``executor``, tell the results."""
    requeue_interrupted(study)
    trials = study.get_trials(deepcopy=False)
    queued = sum(t.state == TrialState.WAITING for t in trials)
    todo = queued + _to_ask(study, rnd)
    done = sum(t.state.is_finished() and _counts(t) for t in trials)
    total = done + todo
    emit(SearchEvent("round", rnd.name, done, total))
    draw = 1 + max((t.user_attrs.get("draw", -1) for t in trials), default=-1)
    running: dict = {}
    while todo or running:
        while todo and len(running) < executor.capacity:
            todo -= 1
            study.sampler = _sampler(rnd, spec, draw)
            trial = study.ask()
            if rnd.method == "random" and "draw" not in trial.user_attrs:  # not a retry
                trial.set_user_attr("draw", draw)
                draw += 1
            job = _job(trial, rnd, spec, out, executor.blas_threads)
            if job is None:  # a bad parameter: recorded, nothing to run
                done += 1
                emit(SearchEvent("trial", rnd.name, done, total, _told(study, trial, rnd, spec)))
                continue
            running[executor.submit(job)] = trial
        if running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                trial = running.pop(future)
                _tell(study, trial, future, spec.objective)
                done += 1
                emit(SearchEvent("trial", rnd.name, done, total, _told(study, trial, rnd, spec)))


def _job(trial, rnd: Round, spec: SearchSpec, out: Path, blas_threads: int) -> dict | None:
    """The training job of an asked trial, or None (trial told FAIL) for a bad parameter."""
    options = {d.name: d.decode(d.suggest(trial)) for d in rnd.space}
    seed = trial_seed(spec.base.seed, options)
    run_dir = out / "runs" / f"{rnd.name}-{trial.number:04d}" if spec.save_runs else None
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("run_dir", "" if run_dir is None else str(run_dir))
    try:
        config = spec.base.replace(**{**options, "seed": seed,
                                      "out": None if run_dir is None else str(run_dir)})
    except ValueError as exc:
        trial.set_user_attr("fail_reason", f"bad parameter: {exc}")
        trial.study.tell(trial, state=TrialState.FAIL)
        return None
    if run_dir is not None and run_dir.exists():
        shutil.rmtree(run_dir)  # left by a study that was deleted: this trial's folder
    return {"config": config.to_dict(), "run_dir": None if run_dir is None else str(run_dir),
            "blas_threads": blas_threads}


def _tell(study, trial, future: Future, objective: str) -> None:
    """Record a finished trial: its numbers and value, or FAIL and the reason."""
    try:
        numbers = future.result()
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # Ray wraps the task's exception
        from klayer.train import DivergenceError

        kind = "diverged" if isinstance(cause, DivergenceError) else type(cause).__name__
        trial.set_user_attr("fail_reason", f"{kind}: {cause}")
        study.tell(trial, state=TrialState.FAIL)
        return
    for key, value in numbers.items():
        trial.set_user_attr(key, value)
    study.tell(trial, numbers[f"val_accuracy_{objective}"])


def _told(study, trial, rnd: Round, spec: SearchSpec) -> dict:
    return trial_row(study._storage.get_trial(trial._trial_id), rnd, spec)


# --- results ---------------------------------------------------------------------------------


def _best_trial(study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number), default=None)


def trial_row(trial, rnd: Round, spec: SearchSpec) -> dict:
    """One trial as a table row: round, number, state, options, seed, numbers, reason."""
    attrs = trial.user_attrs
    row = {"round": rnd.name, "trial": trial.number, "state": trial.state.name}
    for d in rnd.space:
        row[d.name] = d.decode(trial.params[d.name]) if d.name in trial.params else None
    for key in RESULT_KEYS:
        row[key] = trial.value if key == "val_accuracy" else attrs.get(key)
    return row


def best_row(rows: list) -> dict | None:
    """The finished trial with the highest objective (the earliest on a tie)."""
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    return max(complete, key=lambda r: r["val_accuracy"], default=None)


def config_of(row: dict, spec: SearchSpec) -> TrainConfig:
    """The TrainConfig a trial trained (without its run folder)."""
    options = {d.name: row[d.name] for d in spec.space}
    return spec.base.replace(**options, **{"seed": row["seed"], "out": None})


def _columns(rows: list) -> list:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def format_cell(key: str, value) -> str:
    """A table cell: accuracies to 4 decimals, times to 0.1 s, options to 3 digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        if key == "batch_norm":
            return "on" if value else "off"
        return str(value).lower()
    if isinstance(value, float):
        if key.startswith(("val_", "test_")):
            return f"{value:.4f}"
        if key in ("seconds", "best_epoch"):
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def markdown_table(rows: list, max_reason: int = 90) -> str:
    """The trials as a Markdown table (failure reasons shortened)."""
    columns = [c for c in _columns(rows) if c != "run_dir"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(c, row.get(c)) for c in columns]
        cells = [c if len(c) <= max_reason else c[:max_reason - 1] + "…" for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list, spec: SearchSpec) -> list[Path]:
    """trials.csv (full values) and trials.md."""
    from klayer.runs import write_text

    columns = _columns(rows)
    csv_path, md_path = out / "trials.csv", out / "trials.md"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                             for k, v in row.items()})
    objective = "final" if spec.objective == "final" else "best over the history points"
    write_text(md_path, f"# Search: {spec.method}, objective = validation accuracy "
                        f"({objective})\n\n" + markdown_table(rows))
    return [csv_path, md_path]


def write_results(out: Path, rows: list, spec: SearchSpec, best: dict | None,
                  best_config: TrainConfig | None) -> list[Path]:
    """best.toml and (when λ is searched) lambda_search.png."""
    from klayer.runs import write_text

    files = []
    if best_config is not None:
        header = (f"# best trial of klayer search: {best['round']} trial {best['trial']}, "
                  f"validation accuracy {best['val_accuracy']:.4f} ({spec.objective})\n")
        write_text(out / "best.toml", header + best_config.to_toml())
        files.append(out / "best.toml")
    if any(r["state"] == "COMPLETE" and r.get("lam") is not None for r in rows):
        files.append(plot_lambda(rows, out / "lambda_search.png", spec))
    return files


def plot_lambda(rows: list, path, spec: SearchSpec) -> Path:
    """Validation accuracy against λ (log axis): a line per batch-norm setting for the
    first round, crosses for the trials of a fine round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [r for r in rows if r["state"] == "COMPLETE" and r.get("lam") is not None]
    for bn, colour in ((True, "tab:blue"), (False, "tab:orange")):
        mine = sorted((r for r in points if r.get("batch_norm", spec.base.batch_norm) == bn),
                      key=lambda r: r["lam"])
        setting = f"batch norm {'on' if bn else 'off'}"
        first = [r for r in mine if r["round"] == "search"]
        fine = [r for r in mine if r["round"] != "search"]
        if first:
            ax.plot([r["lam"] for r in first], [r["val_accuracy"] for r in first], marker="o",
                    color=colour, label=setting)
        if fine:
            ax.plot([r["lam"] for r in fine], [r["val_accuracy"] for r in fine], "x",
                    color=colour, markersize=8, label=f"{setting}, fine round")
    best = best_row(points)
    ax.plot([best["lam"]], [best["val_accuracy"]], "k*", markersize=12,
            label=f"best: λ = {best['lam']:.3g}, {best['val_accuracy']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("λ (L2 penalty)")
    ax.set_ylabel(f"validation accuracy ({spec.objective})")
    ax.set_title("λ search")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
