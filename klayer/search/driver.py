"""The search driver: asks Optuna for trials, runs them on an executor, tells the results.

The driver process keeps the studies (:mod:`klayer.search.studies`) and is the only one
that writes them; trials run in the driver, in worker processes or as Ray tasks
(:mod:`klayer.search.executors`). A trial's seed is a hash of its parameters and the
base seed (:func:`~klayer.search.space.trial_seed`), so results do not depend on how
trials are scheduled (bit for bit at equal BLAS threads per trial). The objective is the
validation accuracy of the final network ("final", default) or the best one over the
history points ("best"); both are kept as user attributes.

Trials are trained in populations (:func:`klayer.train.train_population`) unless the
search says ``population = false``: the trials asked together whose configurations
differ only in options each member of a population may set for itself (those marked
``member`` in :mod:`klayer.config`: λ, the learning rates and schedule, the
initialisation, the seed, dropout, label smoothing, ...) are one job of at most
``population_size`` members, trained in lockstep on one mini-batch stream. Each trial
keeps its own Optuna trial, value, row, seed (still
:func:`~klayer.search.space.trial_seed`: its weights and dropout masks) and run folder;
a member that diverges is FAIL with its reason while the others complete. Every trial's
``data_seed`` (data order, augmentation, mixing) is the search's: a trial's numbers do
not depend on which trials it was trained with, nor on ``population`` or
``population_size``, and its config (in its run folder, and best.toml for the best)
trained alone with ``klayer train`` gives them again. The driver asks up to
``LOOKAHEAD`` populations' worth of trials at a time (one population's worth with TPE,
which learns from told trials), so that trials of one kind come together; which trials
form a population depends only on the search and ``population_size``, not on the
number of workers.

Running the same search again continues it: finished trials are kept; trials left
RUNNING by a killed process are marked FAIL ("interrupted"), their unfinished run
folders removed, and queued again; FAILed trials (diverged, a worker that died, a bad
parameter) are queued again too unless ``keep_failed``. A trial that fails is recorded
as FAIL with its reason, and the search goes on.

Files in the output folder: ``study.db``, ``runs/<round>-<trial>/`` (one run folder per
trial), ``trials.csv``, ``trials.md``, ``best.toml`` (loadable by ``klayer train
--config``) and ``lambda_search.png`` when λ is searched.
"""

from __future__ import annotations

import shutil
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from optuna.trial import TrialState

from klayer import runs
from klayer.config import SHARED_OPTIONS, TrainConfig
from klayer.nn.errors import UserError
from klayer.search.executors import make_executor
from klayer.search.results import best_row, config_of, trial_row, write_results, write_tables
from klayer.search.space import Round, SearchSpec, trial_config, trial_seed
from klayer.search.studies import (best_trial, counts_towards_round, open_storage, open_study,
                                   requeue_failed, requeue_interrupted, retried_numbers,
                                   sampler_for, stored_trial, trials_to_ask)

LOOKAHEAD = 8  # populations' worth of trials asked at a time (grid and random sampler)


@dataclass
class SearchEvent:
    """What ``on_event`` receives: kind "round" when a round starts (``done`` of
    ``total`` trials already finished), "trial" when a trial finishes (``row``), "note"
    for a line to show (``note``)."""

    kind: str
    round: str
    done: int
    total: int
    row: dict | None = None
    note: str = ""


@dataclass
class SearchResult:
    """The rows of every trial (see :func:`~klayer.search.results.trial_row`), the best
    row and its config, the files written, and the (round, trial) of the FAILed trials
    that a later trial retries."""

    out: Path
    rows: list
    best: dict | None
    best_config: TrainConfig | None
    files: list
    retried: list = field(default_factory=list)

    def counts(self) -> dict:
        """Trials by outcome: complete, failed (and not retried), retried (failed, then
        queued again), other (waiting or running when the search stopped)."""
        retried = set(self.retried)
        counts = {"complete": 0, "failed": 0, "retried": 0, "other": 0}
        for row in self.rows:
            if row["state"] == "COMPLETE":
                counts["complete"] += 1
            elif row["state"] == "FAIL":
                counts["retried" if (row["round"], row["trial"]) in retried else "failed"] += 1
            else:
                counts["other"] += 1
        return counts


def run_search(spec: SearchSpec, out, workers: int = 1, ray_address: str | None = None,
               blas_threads: int | None = None, on_event=None,
               keep_failed: bool = False, executor=None) -> SearchResult:
    """Run (or continue) ``spec`` in folder ``out`` (a relative path is taken from the
    current folder); write the tables, best.toml and the figure; return every trial.

    on_event: receives :class:`SearchEvent` objects. workers, ray_address, blas_threads:
    where trials run (see :func:`~klayer.search.executors.make_executor`). keep_failed:
    do not queue FAILed trials of an earlier run again. executor: run the trials there
    instead (a lane of :class:`~klayer.search.executors.Lanes`, say); its owner closes it.
    """
    from klayer.data import ensure_cifar10

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda event: None)
    with runs.folder_lock(out, "klayer search", kind="search folder"):
        storage = open_storage(out)
        rounds = [spec.first_round()]
        studies = [open_study(storage, rounds[0], spec)]
        ensure_cifar10(spec.base.data_dir, progress=False)  # once, before workers start
        own = executor is None
        if own:
            executor = make_executor(workers, ray_address, blas_threads)
        try:
            _run_round(storage, studies[0], rounds[0], spec, out, executor, emit, keep_failed)
            if spec.method == "coarse-to-fine":
                best = best_trial(studies[0])
                if best is None:
                    raise UserError("no trial of the first round finished; see trials.md")
                rounds.append(spec.fine_round(best.params))
                studies.append(open_study(storage, rounds[1], spec))
                _run_round(storage, studies[1], rounds[1], spec, out, executor, emit,
                           keep_failed)
        finally:  # the tables also after an interruption or an error
            if own:
                executor.close()
            rows, retried = [], []
            for rnd, study in zip(rounds, studies):
                trials = study.get_trials(deepcopy=False)
                rows += [trial_row(t, rnd, spec) for t in trials]
                retried += [(rnd.name, n) for n in sorted(retried_numbers(trials))]
            files = write_tables(out, rows, spec) if rows else []
        best = best_row(rows)
        best_config = None if best is None else config_of(best, spec)
        files += write_results(out, rows, spec, best, best_config)
    return SearchResult(out, rows, best, best_config, files, retried)


def _run_round(storage, study, rnd: Round, spec: SearchSpec, out: Path, executor, emit,
               keep_failed: bool) -> None:
    """Queue again what must be redone, ask for the missing trials of a round, run them
    on ``executor``, tell the results."""
    for trial in requeue_interrupted(storage, study):
        _remove_unfinished_run(trial, out)
    if not keep_failed:
        requeue_failed(study)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    queued = sum(t.state == TrialState.WAITING for t in trials)
    todo = queued + trials_to_ask(study, rnd)
    done = sum(t.state.is_finished() and counts_towards_round(t, retried) for t in trials)
    total = done + todo
    emit(SearchEvent("round", rnd.name, done, total))
    shared = [d.name for d in rnd.space if d.name in (*SHARED_OPTIONS, "n_s", "cycles")]
    if spec.population and shared:
        emit(SearchEvent("note", rnd.name, done, total, note=(
            f"trials with different {', '.join(shared)} cannot share a mini-batch stream "
            "(or number of steps): only trials with equal values train together")))
    draw = 1 + max((t.user_attrs.get("draw", -1) for t in trials), default=-1)
    size = spec.population_size if spec.population else 1
    ahead = size if rnd.method == "random" and spec.sampler == "tpe" else size * LOOKAHEAD
    running: dict = {}  # future -> the trials of its job

    def tell(future):
        nonlocal done
        members = running.pop(future)
        for trial, outcome in zip(members, _outcomes(future, len(members))):
            _tell(study, trial, outcome, spec.objective)
            done += 1
            emit(SearchEvent("trial", rnd.name, done, total,
                             _finished_row(storage, study, trial.number, rnd, spec)))

    while todo or running:
        while todo and len(running) < executor.capacity:
            asked = []  # (trial, config, job) of the trials to train
            for _ in range(1 if size == 1 else min(todo, ahead)):
                todo -= 1
                study.sampler = sampler_for(rnd, spec, draw)
                trial = study.ask()
                if rnd.method == "random" and "draw" not in trial.user_attrs:  # not a retry
                    trial.set_user_attr("draw", draw)
                    draw += 1
                job = _job(trial, rnd, spec, out, executor.blas_threads)
                if job is None:  # a bad parameter: recorded, nothing to run
                    done += 1
                    emit(SearchEvent("trial", rnd.name, done, total,
                                     _finished_row(storage, study, trial.number, rnd, spec)))
                    continue
                asked.append((trial, *job))
            for group in group_configs([config for _, config, _ in asked], size):
                members = [asked[i] for i in group]
                future = executor.submit(_population_job(members))
                running[future] = [trial for trial, _, _ in members]
                if future.done():  # trained in this process: told before the next one
                    tell(future)
        if running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                tell(future)


def group_configs(configs, max_size: int, available: int | None = None) -> list[list[int]]:
    """The indices of ``configs`` in populations: equal
    :meth:`~klayer.config.TrainConfig.shared_options`, in order of first appearance, at
    most ``max_size`` members and (by :func:`klayer.memory.estimate`: the data once,
    everything else per member) what fits in ``available`` bytes (default: the memory
    free now)."""
    from klayer import memory

    if max_size < 1:
        raise UserError(f"max_size must be at least 1, got {max_size}")
    available = memory.available_bytes() if available is None else available
    keyed: dict = {}
    groups: list[list[int]] = []
    for i, config in enumerate(configs):
        key = config.shared_options()
        parts = memory.estimate(config)
        need = sum(parts.values()) - parts["data"]
        group = keyed.get(key)
        if group is not None and len(group[0]) < max_size and \
                (available is None or group[1] + need <= available):
            group[0].append(i)
            group[1] += need
            continue
        keyed[key] = [[i], parts["data"] + need]
        groups.append(keyed[key][0])
    return groups


def _remove_unfinished_run(trial, out: Path) -> None:
    """Delete the run folder an interrupted trial left (its retry trains in its own)."""
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir and Path(run_dir).resolve().parent == out / "runs" and Path(run_dir).is_dir():
        shutil.rmtree(run_dir)


def _job(trial, rnd: Round, spec: SearchSpec, out: Path, blas_threads: int):
    """(config, training job) of an asked trial, or None (trial told FAIL) for a bad
    parameter."""
    options = {d.name: d.decode(d.suggest(trial)) for d in rnd.space}
    seed = trial_seed(spec.base.seed, options)
    run_dir = out / "runs" / f"{rnd.name}-{trial.number:04d}" if spec.save_runs else None
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("run_dir", "" if run_dir is None else str(run_dir))
    try:
        config = trial_config(spec.base, options, seed,
                              None if run_dir is None else str(run_dir))
    except ValueError as exc:
        trial.set_user_attr("fail_reason", f"bad parameter: {exc}")
        trial.study.tell(trial, state=TrialState.FAIL)
        return None
    if run_dir is not None and run_dir.exists():
        shutil.rmtree(run_dir)  # left by a study that was deleted: this trial's folder
    return config, {"configs": [config.to_dict()],
                    "run_dirs": [None if run_dir is None else str(run_dir)],
                    "blas_threads": blas_threads, "train_history": False}


def _population_job(members) -> dict:
    """The job of one trial, or of several trained as one population ((trial, config,
    job) each); each trial of a population records its first trial's number."""
    if len(members) == 1:
        return members[0][2]
    for trial, _, _ in members:
        trial.set_user_attr("population", members[0][0].number)
    return {"configs": [job["configs"][0] for _, _, job in members],
            "run_dirs": [job["run_dirs"][0] for _, _, job in members],
            "blas_threads": members[0][2]["blas_threads"], "train_history": False}


def _outcomes(future: Future, size: int) -> list:
    """Per trial of a finished job: its numbers, or the exception that failed it."""
    try:
        numbers = future.result()
    except Exception as exc:  # the whole job failed: every trial of it
        return [exc] * size
    return [m if "fail_reason" not in m else _MemberFailed(m["fail_reason"])
            for m in numbers["members"]]


class _MemberFailed(Exception):
    """A trial that diverged (in a population, while the others went on)."""

    def __str__(self):
        return self.args[0]


def _tell(study, trial, outcome, objective: str) -> None:
    """Record a finished trial: its numbers and value, or FAIL and the reason."""
    if isinstance(outcome, Exception):
        cause = getattr(outcome, "cause", None) or outcome  # Ray wraps the task's exception
        reason = str(cause) if isinstance(cause, _MemberFailed) \
            else f"{type(cause).__name__}: {cause}"
        trial.set_user_attr("fail_reason", reason)
        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and not Path(run_dir).is_dir():  # a Ray trial sends its folder only at the end
            trial.set_user_attr("run_dir", "")
        study.tell(trial, state=TrialState.FAIL)
        return
    numbers = outcome
    for key, value in numbers.items():
        trial.set_user_attr(key, value)
    study.tell(trial, numbers[f"val_accuracy_{objective}"])


def _finished_row(storage, study, number: int, rnd: Round, spec: SearchSpec) -> dict:
    """The table row of a trial just told (as stored, with its state and attributes)."""
    return trial_row(stored_trial(storage, study, number), rnd, spec)
