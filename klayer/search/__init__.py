"""Hyper-parameter search over training options, built on Optuna.

- :mod:`klayer.search.space`: what a search varies (Dimension, SearchSpec, search files);
- :mod:`klayer.search.studies`: the Optuna storage, samplers and studies;
- :mod:`klayer.search.executors`: where trials run (the driver, worker processes, Ray),
  and the one trial function the search and the study share;
- :mod:`klayer.search.driver`: :func:`run_search`, which ties them together and groups
  trials into populations (:func:`klayer.train.train_population`);
- :mod:`klayer.search.results`: trials.csv, trials.md, best.toml and the λ figure.
"""

from klayer.search.driver import SearchEvent, SearchResult, run_search
from klayer.search.executors import dataset_for, make_executor, run_trial
from klayer.search.results import (RESULT_KEYS, best_row, config_of, format_cell,
                                   markdown_table, trial_row)
from klayer.search.space import (METHODS, OBJECTIVES, POPULATION_SIZE, SAMPLERS, Dimension,
                                 Round, SearchSpec, load_search, log_grid, parse_search,
                                 read_search_toml, trial_seed)
from klayer.search.studies import INTERRUPTED, STUDY_FILE, storage_url

__all__ = [
    "INTERRUPTED", "METHODS", "OBJECTIVES", "POPULATION_SIZE", "RESULT_KEYS", "SAMPLERS",
    "STUDY_FILE",
    "Dimension", "Round", "SearchEvent", "SearchResult", "SearchSpec", "best_row",
    "config_of", "dataset_for", "format_cell", "load_search", "log_grid", "make_executor",
    "markdown_table", "parse_search", "read_search_toml", "run_search", "run_trial",
    "storage_url", "trial_row", "trial_seed",
]
