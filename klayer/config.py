"""Training configuration: one validated dataclass, read from and written to TOML.

A :class:`TrainConfig` holds every option of a training run. It is what a config file
in ``configs/`` contains (flat ``key = value`` lines, unknown keys are an error), what
``klayer train`` flags override, and what a run folder's ``config.toml`` records.
:meth:`TrainConfig.config_hash` names the options that change a run's results, so
finished runs can be found and reused.

Adding an option later (dropout, layer norm, another optimizer, ...): add a field with
a default that keeps today's behaviour, a check in ``_validate``, and, when that default
means "feature off", ``metadata={"neutral": default}`` so runs that do not use the
feature keep the hash they had before the option existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from klayer.data import PROTOCOLS
from klayer.optim import OPTIMIZERS
from klayer.schedules import SCHEDULES

INITS = ("he", "xavier")
NORM_POSITIONS = ("before", "after")
DTYPES = ("float32", "float64")

_NO_HASH = {"hash": False}  # options that do not change a run's results


@dataclass(frozen=True)
class TrainConfig:
    """Every training option, with SPEC.md's defaults.

    The model: ``hidden_sizes`` (widths of the k-1 hidden layers), ``batch_norm``,
    ``init`` ("he", "xavier" or σ for N(0, σ²)), ``dtype``, ``seed`` (initial weights
    and the shuffling order).
    Cost and optimisation: J = loss + ``lam`` Σ ||W||²; ``optimizer``; ``schedule``
    ("cyclic": η from ``eta_min`` up to ``eta_max`` over ``n_s`` steps and back;
    "constant": η = ``eta_max``); ``cycles`` × 2·n_s update steps in all, on
    mini-batches of ``batch_size``; ``evals_per_cycle`` history points per cycle.
    Data (see :func:`klayer.data.load_cifar10`): ``data_dir``, ``protocol``, ``n_val``,
    ``subset``. Output: ``out``, the run folder.

    Beyond the study (all off by default; see README "Beyond the study"):
    ``layer_norm`` (instead of batch norm), ``norm_position`` ("before"/"after" the
    ReLU), ``residual``, ``dropout`` (probability p), ``label_smoothing`` (ε);
    augmentation ``flip``, ``translate`` (pixels), ``jitter``; schedules "step"
    (η_max · ``decay_rate``^⌊t / ``decay_every``⌋) and "cosine" (η_max down to η_min),
    both after ``warmup_steps`` of linear warm-up; ``precise_bn``: after training,
    recompute the batch-norm statistics over this many training batches (PreciseBN).
    """

    hidden_sizes: tuple = (50, 50)
    batch_norm: bool = True
    init: str | float = "he"
    dtype: str = "float64"
    seed: int = 0
    lam: float = 0.005
    optimizer: str = field(default="sgd", metadata={"neutral": "sgd"})
    schedule: str = "cyclic"
    eta_min: float = 1e-5
    eta_max: float = 1e-1
    n_s: int = 2250
    cycles: int = 2
    batch_size: int = 100
    evals_per_cycle: int = 10
    data_dir: str | None = field(default=None, metadata=_NO_HASH)
    protocol: str = "full"
    n_val: int = 5000
    subset: int | None = None
    out: str | None = field(default=None, metadata=_NO_HASH)
    layer_norm: bool = field(default=False, metadata={"neutral": False})
    norm_position: str = field(default="before", metadata={"neutral": "before"})
    residual: bool = field(default=False, metadata={"neutral": False})
    dropout: float = field(default=0.0, metadata={"neutral": 0.0})
    label_smoothing: float = field(default=0.0, metadata={"neutral": 0.0})
    flip: bool = field(default=False, metadata={"neutral": False})
    translate: int = field(default=0, metadata={"neutral": 0})
    jitter: float = field(default=0.0, metadata={"neutral": 0.0})
    decay_rate: float = field(default=0.1, metadata={"neutral": 0.1})
    decay_every: int | None = field(default=None, metadata={"neutral": None})
    warmup_steps: int = field(default=0, metadata={"neutral": 0})
    precise_bn: int = field(default=0, metadata={"neutral": 0})

    def __post_init__(self):
        for name, value in _validate(self).items():
            object.__setattr__(self, name, value)

    # --- derived quantities -----------------------------------------------------------

    @property
    def total_steps(self) -> int:
        """cycles · 2 n_s update steps."""
        return self.cycles * 2 * self.n_s

    def eval_steps(self) -> list[int]:
        """Steps after which the history is recorded: 0, the end, and evals_per_cycle
        evenly spaced points in every cycle (t = j · 2 n_s / evals_per_cycle, rounded down)."""
        cycle = 2 * self.n_s
        points = {j * cycle // self.evals_per_cycle
                  for j in range(self.cycles * self.evals_per_cycle + 1)}
        return sorted(points | {0, self.total_steps})

    # --- changing, comparing ----------------------------------------------------------

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with some options changed."""
        _reject_unknown(changes, "option")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: dict) -> "TrainConfig":
        """:meth:`replace` with the options whose value is not None (unset CLI flags)."""
        return self.replace(**{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        """Options as plain Python values (lists, not tuples), None included."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, options: dict) -> "TrainConfig":
        _reject_unknown(options, "key")
        return cls(**options)

    def config_hash(self) -> str:
        """A stable 16-hex-digit digest of the options that affect results.

        Leaves out ``data_dir`` and ``out`` (where things are, not what is computed) and
        options at their "neutral" value (see the module docstring).
        """
        options = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("hash", True):
                continue
            if "neutral" in f.metadata and value == f.metadata["neutral"]:
                continue
            options[f.name] = _plain(value)
        text = json.dumps(options, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # --- TOML -------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, path) -> "TrainConfig":
        """Read a flat TOML file of options; unknown keys and bad values are errors."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                options = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict(options)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_toml(self) -> str:
        """The options as TOML text, one ``key = value`` line each (None options omitted)."""
        lines = ["# klayer training configuration"]
        for name, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    def write_toml(self, path) -> None:
        Path(path).write_text(self.to_toml(), encoding="utf-8")


# --- validation -----------------------------------------------------------------------


def _validate(c: TrainConfig) -> dict:
    """Check every option; return the normalised values (tuples, floats, str paths)."""
    v = {
        "hidden_sizes": _int_list(c.hidden_sizes, "hidden_sizes"),
        "batch_norm": _bool(c.batch_norm, "batch_norm"),
        "init": _init(c.init),
        "dtype": _choice(c.dtype, "dtype", DTYPES),
        "seed": _int(c.seed, "seed", minimum=0),
        "lam": _number(c.lam, "lam", minimum=0.0),
        "optimizer": _choice(c.optimizer, "optimizer", tuple(OPTIMIZERS)),
        "schedule": _choice(c.schedule, "schedule", SCHEDULES),
        "eta_min": _number(c.eta_min, "eta_min", minimum=0.0),
        "eta_max": _number(c.eta_max, "eta_max", minimum=0.0, strict=True),
        "n_s": _int(c.n_s, "n_s"),
        "cycles": _int(c.cycles, "cycles"),
        "batch_size": _int(c.batch_size, "batch_size", minimum=2 if c.batch_norm else 1),
        "evals_per_cycle": _int(c.evals_per_cycle, "evals_per_cycle"),
        "data_dir": _path(c.data_dir, "data_dir"),
        "protocol": _choice(c.protocol, "protocol", PROTOCOLS),
        "n_val": _int(c.n_val, "n_val"),
        "subset": None if c.subset is None else _int(c.subset, "subset"),
        "out": _path(c.out, "out"),
        "layer_norm": _bool(c.layer_norm, "layer_norm"),
        "norm_position": _choice(c.norm_position, "norm_position", NORM_POSITIONS),
        "residual": _bool(c.residual, "residual"),
        "dropout": _fraction(c.dropout, "dropout"),
        "label_smoothing": _fraction(c.label_smoothing, "label_smoothing"),
        "flip": _bool(c.flip, "flip"),
        "translate": _int(c.translate, "translate", minimum=0),
        "jitter": _fraction(c.jitter, "jitter"),
        "decay_rate": _number(c.decay_rate, "decay_rate", minimum=0.0, strict=True),
        "decay_every": None if c.decay_every is None else _int(c.decay_every, "decay_every"),
        "warmup_steps": _int(c.warmup_steps, "warmup_steps", minimum=0),
        "precise_bn": _int(c.precise_bn, "precise_bn", minimum=0),
    }
    if v["batch_norm"] and v["layer_norm"]:
        raise ValueError("config: batch_norm and layer_norm are alternatives; set "
                         "batch_norm = false to use layer_norm")
    if v["precise_bn"] and not v["batch_norm"]:
        raise ValueError("config: precise_bn recomputes batch-norm statistics; it needs "
                         "batch_norm = true")
    if v["translate"] >= 16:
        raise ValueError(f"config: translate must be under 16 pixels, got {v['translate']}")
    if v["decay_rate"] > 1:
        raise ValueError(f"config: decay_rate must be in (0, 1], got {v['decay_rate']}")
    if v["warmup_steps"] and v["schedule"] == "cyclic":
        raise ValueError("config: warmup_steps does not apply to the cyclic schedule, which "
                         "starts at eta_min already; set it to 0 or choose another schedule")
    if v["warmup_steps"] >= v["cycles"] * 2 * v["n_s"]:
        raise ValueError(f"config: warmup_steps ({v['warmup_steps']}) must be fewer than "
                         f"the {v['cycles'] * 2 * v['n_s']} training steps")
    if v["eta_min"] > v["eta_max"]:
        raise ValueError(f"config: eta_min ({v['eta_min']}) must not exceed "
                         f"eta_max ({v['eta_max']})")
    return v


def _reject_unknown(options: dict, what: str) -> None:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown config {what}(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(known)}")


def _int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"config: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(value, name, minimum, strict=False):
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"config: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _fraction(value, name):
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and 0 <= value < 1)
    if not ok:
        raise ValueError(f"config: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"config: {name} must be true or false, got {value!r}")
    return value


def _choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"config: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _int_list(value, name):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"config: {name} must be a list of positive integers, got {value!r}")
    return tuple(_int(h, f"{name} entries") for h in value)


def _init(value):
    if value in INITS:
        return value
    if not isinstance(value, bool) and isinstance(value, numbers.Real) \
            and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError(f"config: init must be one of {', '.join(INITS)} or a number σ > 0 "
                     f"(weights N(0, σ²)), got {value!r}")


def _path(value, name):
    if value is None:
        return None
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"config: {name} must be a folder path, got {value!r}")
    return value


# --- TOML writing ---------------------------------------------------------------------


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def toml_value(value) -> str:
    """One TOML value: bool, int, float, string, or a list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form; finite by validation
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
