"""The Optuna side of a search: storage, samplers, studies, and trials queued again.

The driver keeps one SQLite storage (``study.db`` in the output folder) with one study
per round ("search", then "fine" for coarse-to-fine), and drives it with Optuna's
ask-and-tell interface. Only Optuna's public API is used: the storage object opened
here, ``Study.ask``/``tell``/``add_trial``/``get_trials`` and ``BaseStorage`` methods.

A trial that cannot finish is queued again as a new WAITING trial with the same
parameters (and, for a grid, the same grid point), its system attributes naming the
trial it retries (``failed_trial``, ``retry_history``), as Optuna's
``RetryHeartbeatStaleTrialCallback`` records them: trials left RUNNING by a stopped
search always, FAILed trials unless the search keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from klayer.nn.errors import UserError
from klayer.search.space import Round, SearchSpec, grid_points

STUDY_FILE = "study.db"
INTERRUPTED = "interrupted: the search stopped while this trial ran; queued again"


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


def sampler_for(rnd: Round, spec: SearchSpec, draw: int):
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
        raise UserError(f"the study '{rnd.name}' in {STUDY_FILE} belongs to another search "
                        f"(different {', '.join(changed)}); use another --out folder")
    return study


def trial_id(storage, study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` of ``study``."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def stored_trial(storage, study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` as stored now (its state, value and attributes)."""
    return storage.get_trial(trial_id(storage, study, number))


def retried_numbers(trials) -> set[int]:
    """Numbers of the trials that a later trial retries."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def _queue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue ``trial`` again as a new WAITING trial with the same parameters and grid
    point (system attributes), keeping its random draw number."""
    system_attrs = {"failed_trial": trial.number, **trial.system_attrs}
    system_attrs["retry_history"] = [*trial.system_attrs.get("retry_history", ()), trial.number]
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "draw"}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs, system_attrs=system_attrs))


def _can_retry(trial) -> bool:
    """A trial killed before its parameters were drawn has nothing to repeat: the round
    asks for a new one instead."""
    return bool(trial.params) or "grid_id" in trial.system_attrs


def requeue_interrupted(storage, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Mark trials left RUNNING by a stopped search as FAIL ("interrupted") and queue
    them again. Call it only while no other process runs this study. Returns the
    interrupted trials as they were."""
    stale = study.get_trials(deepcopy=True, states=(TrialState.RUNNING,))
    for trial in stale:
        stored_id = trial_id(storage, study, trial.number)
        storage.set_trial_user_attr(stored_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(stored_id, state=TrialState.FAIL)
        if _can_retry(trial):
            _queue_retry(study, trial)
    return stale


def requeue_failed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Queue again every FAILed trial that no trial retries yet; returns them."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried
              and _can_retry(t)]
    for trial in failed:
        _queue_retry(study, trial)
    return failed


def counts_towards_round(trial, retried: set[int]) -> bool:
    """Whether a trial takes one of the round's places: not when a later trial retries
    it, nor when it was interrupted before its parameters were drawn."""
    if trial.number in retried:
        return False
    return trial.user_attrs.get("fail_reason") != INTERRUPTED or _can_retry(trial)


def trials_to_ask(study: optuna.Study, rnd: Round) -> int:
    """New trials still to ask for (besides the queued ones)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    trials = [t for t in trials if counts_towards_round(t, retried)]
    if rnd.method == "random":
        return max(0, rnd.n_trials - len(trials))
    covered = {json.dumps(t.params, sort_keys=True) for t in trials}
    return sum(json.dumps(p, sort_keys=True) not in covered for p in grid_points(rnd))


def best_trial(study: optuna.Study):
    """The COMPLETE trial with the highest value (the earliest on a tie), or None."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number), default=None)
