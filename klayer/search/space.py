"""The search space: what a search varies, read from a search file.

A search is a base :class:`~klayer.config.TrainConfig` and a *space*: the options to
vary, each a :class:`Dimension` (a log-uniform, uniform or integer range, optionally
with a grid of N values, or a list of choices). Methods:

- "grid": every combination of the grid values;
- "random": ``n_trials`` draws (seeded random sampler, or TPE);
- "coarse-to-fine": a grid, then ``fine_trials`` random draws in a second round whose
  ranges are narrowed to ± ``fine_width`` grid steps around the best coarse trial
  (choices fixed at the best one).

A search file is a training config (flat ``key = value`` options, the base) with a
``[search]`` table::

    n_s = 900
    [search]
    method = "grid"              # or "random" (n_trials = ...), "coarse-to-fine"
    population = true            # train trials together in populations (default)
    [search.space.lam]
    log_uniform = [1e-5, 1e-1]   # or uniform = [a, b], int_uniform = [a, b]
    grid = 8                     # 10^l, l evenly spaced in [-5, -1]
    [search.space.batch_norm]
    choice = [true, false]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klayer.config import TrainConfig
from klayer.nn.errors import UserError

METHODS = ("grid", "random", "coarse-to-fine")
SAMPLERS = ("random", "tpe")
OBJECTIVES = ("final", "best")
KINDS = ("log_uniform", "uniform", "int_uniform", "choice")
NOT_SEARCHABLE = ("out", "data_dir")  # where things are, not what is computed
SEARCH_KEYS = ("method", "n_trials", "seed", "sampler", "objective", "fine_trials",
               "fine_width", "save_runs", "population", "population_size", "space")
POPULATION_SIZE = 8  # members of a population at most, by default


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
            raise UserError(f"search.space.{self.name}: a grid search needs `grid = N` "
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
            raise UserError(f"search.space.{self.name}: {value!r} is not one of the choices")
        return int(value) if self.kind == "int_uniform" else float(value)

    def narrowed(self, best, width: float) -> "Dimension":
        """The fine-round dimension: ± width grid steps around ``best`` (a stored value),
        clipped to the range, sampled without a grid; a choice keeps only ``best``."""
        if self.kind == "choice":
            return Dimension(self.name, "choice", choices=(self.decode(best),))
        if self.grid is None:
            raise UserError(f"search.space.{self.name}: coarse-to-fine needs `grid = N`")
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
        raise UserError(f"{where}: not a searchable training option; choose from "
                        f"{', '.join(searchable)}")
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a table like {{ log_uniform = [1e-5, 1e-1], grid = 8 }}")
    kinds = [k for k in KINDS if k in entry]
    unknown = sorted(set(entry) - set(KINDS) - {"grid"})
    if len(kinds) != 1 or unknown:
        raise UserError(f"{where} needs exactly one of {', '.join(KINDS)} (and optionally "
                        f"grid = N), got keys {', '.join(sorted(entry))}")
    kind, value, grid = kinds[0], entry[kinds[0]], entry.get("grid")
    if kind == "choice":
        if grid is not None:
            raise UserError(f"{where}: grid applies to ranges; a choice is searched in full")
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: choice must be a non-empty list")
        return Dimension(name, kind, choices=tuple(value))
    numbers = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if not numbers or not value[0] < value[1]:
        raise UserError(f"{where}: {kind} must be [low, high] with low < high, got {value!r}")
    if kind == "log_uniform" and value[0] <= 0:
        raise UserError(f"{where}: log_uniform needs low > 0, got {value[0]!r}")
    if kind == "int_uniform" and not all(isinstance(v, int) for v in value):
        raise UserError(f"{where}: int_uniform needs integer bounds, got {value!r}")
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 2):
        raise UserError(f"{where}: grid must be an integer >= 2, got {grid!r}")
    low, high = (int(v) for v in value) if kind == "int_uniform" else (float(v) for v in value)
    return Dimension(name, kind, low, high, grid)


@dataclass(frozen=True)
class SearchSpec:
    """A whole search: base config, space, method and its settings (see the module doc).

    n_trials: draws of a random search (a grid runs every point). seed: of the samplers
    (the training seeds come from :func:`trial_seed`). sampler: "random" or "tpe" for
    random draws. fine_trials, fine_width: the second round of coarse-to-fine.
    save_runs: keep a run folder per trial (model, history, figures).
    population: train trials that differ only in per-member options together, at most
    ``population_size`` at a time (see :mod:`klayer.search.driver`).
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
    population: bool = True
    population_size: int = POPULATION_SIZE

    def __post_init__(self):
        object.__setattr__(self, "space", tuple(self.space))
        names = [d.name for d in self.space]
        if not names:
            raise UserError("search: the space is empty; add [search.space.<option>] entries")
        if len(set(names)) != len(names):
            raise UserError(f"search: an option appears twice in the space: {names}")
        for key, allowed in (("method", METHODS), ("sampler", SAMPLERS),
                             ("objective", OBJECTIVES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"search: {key} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, key)!r}")
        for key, minimum in (("seed", 0), ("fine_trials", 1), ("population_size", 1)):
            check_int(getattr(self, key), key, minimum)
        if self.n_trials is not None:
            check_int(self.n_trials, "n_trials", 1)
        if self.method == "random" and self.n_trials is None:
            raise UserError("search: method = \"random\" needs n_trials")
        if self.method != "random":
            for d in self.space:
                d.values()  # a grid needs grid = N on every range
        if not (isinstance(self.fine_width, (int, float)) and self.fine_width > 0):
            raise UserError(f"search: fine_width must be > 0, got {self.fine_width!r}")
        for key in ("save_runs", "population"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"search: {key} must be true or false, got "
                                f"{getattr(self, key)!r}")

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


def check_int(value, name, minimum):
    """An integer setting of the search (``name``) at least ``minimum``, or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"search: {name} must be an integer >= {minimum}, got {value!r}")


def parse_search(options: dict) -> SearchSpec:
    """A SearchSpec from a TOML document: the ``[search]`` table (with its ``space``)
    and, around it, the base TrainConfig's options."""
    options = dict(options)
    table = options.pop("search", None)
    if not isinstance(table, dict):
        raise UserError("a search file needs a [search] table (method, n_trials, seed, ...) "
                        "and [search.space.<option>] entries")
    unknown = sorted(set(table) - set(SEARCH_KEYS))
    if unknown:
        raise UserError(f"unknown [search] key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(SEARCH_KEYS)}")
    table = dict(table)
    space = table.pop("space", {})
    if not isinstance(space, dict):
        raise UserError("search.space must be a table of options")
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
        raise UserError(f"{path}: not valid TOML: {exc}") from None


def load_search(path) -> SearchSpec:
    """A SearchSpec from a TOML file (see :func:`parse_search`)."""
    try:
        return parse_search(read_search_toml(path))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None


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


def trial_config(base, options: dict, seed: int, out=None):
    """The TrainConfig of a trial: ``base`` with its options, its seed (weights, dropout)
    and the search's data seed (data order, augmentation, mixing: the same for every
    trial, so that a trial's numbers do not depend on the trials trained beside it)."""
    return base.replace(**{"data_seed": base.stream_seed, **options, "seed": seed,
                           "out": out})



def grid_points(rnd: Round) -> list[dict]:
    """Every point of a grid round, as Optuna stores the parameters."""
    names = [d.name for d in rnd.space]
    combos = itertools.product(*(d.values() for d in rnd.space))
    return [dict(zip(names, combo)) for combo in combos]
