"""Training configuration: one validated dataclass, read from and written to TOML.

A :class:`TrainConfig` holds every option of a training run. It is what a config file
in ``configs/`` contains (flat ``key = value`` lines, unknown keys are an error), what
``klayer train`` and ``klayer search`` flags override, and what a run folder's
``config.toml`` records. :meth:`TrainConfig.config_hash` names the options that change a
run's results, so finished runs can be found and reused.

Each option is declared once, as a field whose metadata holds everything about it: its
help text, its check (a validator of :mod:`klayer.nn.checks`), and where needed its flag
(``--lambda`` for ``lam``), metavar, choices, how a flag's text becomes a value
(``parse``) and its "neutral" value. :func:`add_option_flags` builds the command-line
flags from these fields, and validation walks them; rules that tie several options
together live in :func:`_cross_checks`.

Adding an option later (dropout, layer norm, another optimizer, ...): add a field with
a default that keeps today's behaviour and, when that default means "feature off",
``neutral=default`` so runs that do not use the feature keep the hash they had before
the option existed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from klayer.nn import checks
from klayer.levers.augment import PAD_MODES
from klayer.nn.checks import DTYPES
from klayer.data import PROTOCOLS
from klayer.nn.errors import UserError
from klayer.nn.layers import BN_MIN_BATCH
from klayer.nn.network import INITS, NORM_POSITIONS
from klayer.nn.optim import OPTIMIZERS
from klayer.nn.schedules import SCHEDULES

_NOT_NEUTRAL = object()
WHITENINGS = ("none", "zca", "pca")


def option(default, help: str, check, *, flag: str | None = None, metavar: str | None = None,
           choices=None, parse=None, neutral=_NOT_NEUTRAL, hashed: bool = True,
           beyond: bool = False, member: bool = False):
    """A :class:`TrainConfig` field and everything the command line and validation need.

    check(value, name) -> normalised value, or ValueError; parse(text) -> value for the
    flag (default: the type of ``default``); ``neutral``: the value at which the option
    is left out of the hash; ``hashed=False``: never in the hash (where things are, not
    what is computed); ``beyond``: listed under "beyond the study" in ``--help``;
    ``member``: each member of a population may set it for itself (otherwise the members
    of a population share it: the data, the architecture, the mini-batch stream).
    """
    metadata = {"help": help, "check": check, "flag": flag, "metavar": metavar,
                "choices": choices, "parse": parse, "hash": hashed, "beyond": beyond,
                "member": member}
    if choices is not None:
        metadata["check"] = partial(check, choices=choices)
    if neutral is not _NOT_NEUTRAL:
        metadata["neutral"] = neutral
    return field(default=default, metadata=metadata)


_integer = checks.integer
_natural = partial(checks.integer, minimum=0)
_positive = partial(checks.number, minimum=0.0, strict=True)
_nonnegative = partial(checks.number, minimum=0.0)


@dataclass(frozen=True)
class TrainConfig:
    """Every training option, with the study's defaults.

    The model: ``hidden_sizes`` (widths of the k-1 hidden layers), ``batch_norm``,
    ``init`` ("he", "xavier" or σ for N(0, σ²)), ``dtype``, ``seed`` (initial weights,
    dropout masks and, unless ``data_seed`` is set, the data order, augmentation and
    mixing).
    Cost and optimisation: J = loss + ``lam`` Σ ||W||²; ``optimizer``; ``schedule``
    ("cyclic": η from ``eta_min`` up to ``eta_max`` over ``n_s`` steps and back;
    "constant": η = ``eta_max``); ``cycles`` × 2·n_s update steps in all, on
    mini-batches of ``batch_size``; ``evals_per_cycle`` history points per cycle.
    Data (see :func:`klayer.data.load_cifar10`): ``data_dir``, ``protocol``, ``n_val``,
    ``subset``. Output: ``out``, the run folder.

    Beyond the study (all off by default; see docs/training.md, "Training options"):
    ``layer_norm`` (instead of batch norm), ``norm_position`` ("before"/"after" the
    ReLU), ``residual``, ``dropout`` (probability p), ``label_smoothing`` (ε);
    augmentation ``flip``, ``translate`` (pixels), ``jitter``; schedules "step"
    (η_max · ``decay_rate``^⌊t / ``decay_every``⌋) and "cosine" (η_max down to η_min),
    both after ``warmup_steps`` of linear warm-up; ``precise_bn``: after training,
    recompute the batch-norm statistics over this many training batches (PreciseBN);
    ``pad_mode`` of the translations ("mean", "reflect", "edge"); label mixing ``mixup``
    and ``cutmix`` (Beta α, 0 = off; soft targets); ``whiten`` ("none", "zca": every
    image once, fitted mirror-symmetric, before augmentation; "pca": every batch after
    it, ``whiten_components`` kept) with ``whiten_eps``, folded into the first layer of
    the saved model; ``ema``: decay of an exponential moving average of the weights,
    which becomes the final network (the plain weights' results are kept beside it);
    ``data_seed``: the seed of the data order, augmentation and mixing (None: ``seed``),
    which the members of a population share.
    """

    hidden_sizes: tuple = option(
        (50, 50), "hidden layer widths, e.g. 50,50; \"\" for none", checks.widths,
        flag="--hidden", metavar="W1,W2,...", parse=checks.parse_widths)
    batch_norm: bool = option(True, "batch normalization in the hidden layers", checks.boolean)
    init: str | float = option(
        "he", "weight initialisation: he, xavier or σ for N(0, σ²)",
        partial(checks.init, inits=INITS), metavar="he|xavier|σ", parse=str, member=True)
    dtype: str = option("float32", "float precision (float32: the default, fast; float64: exact comparisons)", checks.choice, choices=DTYPES)
    seed: int = option(0, "seed of the weights and dropout (and of the data order, unless "
                       "--data-seed)", _natural, member=True)
    lam: float = option(0.005, "L2 penalty λ", _nonnegative, flag="--lambda", metavar="λ",
                        member=True)
    optimizer: str = option(
        "sgd", "parameter update: sgd, momentum (μ = 0.9) or adam (β = 0.9, 0.999)",
        checks.choice, choices=tuple(OPTIMIZERS), neutral="sgd")
    schedule: str = option(
        "cyclic", "learning-rate schedule: cyclic, constant (η = eta_max), step (see "
        "--decay-rate) or cosine (eta_max down to eta_min)", checks.choice, choices=SCHEDULES,
        member=True)
    eta_min: float = option(1e-5, "smallest learning rate", _nonnegative, metavar="η",
                            member=True)
    eta_max: float = option(1e-1, "largest learning rate", _positive, metavar="η", member=True)
    n_s: int = option(2250, "steps of a half cycle", _integer, metavar="STEPS", member=True)
    cycles: int = option(2, "number of cycles (2·n_s steps each)", _integer, metavar="N",
                         member=True)
    batch_size: int = option(100, "mini-batch size", _integer, metavar="N")
    evals_per_cycle: int = option(10, "history points per cycle", _integer, metavar="N",
                                  member=True)
    data_dir: str | None = option(
        None, "where CIFAR-10 is (default: $KLAYER_DATA, else the user cache)", checks.path, metavar="DIR",
        parse=str, hashed=False)
    protocol: str = option("full", "data split (full: 45k/5k/10k)", checks.choice,
                           choices=PROTOCOLS)
    n_val: int = option(5000, "validation images (protocol full)", _integer, metavar="N")
    subset: int | None = option(None, "use only N images of each split",
                                checks.optional(_integer), metavar="N", parse=int)
    out: str | None = option(None, "run folder (default runs/<name>)", checks.path,
                             metavar="RUN", parse=str, hashed=False, member=True)
    layer_norm: bool = option(
        False, "layer normalization instead of batch norm (with --no-batch-norm)",
        checks.boolean, neutral=False, beyond=True)
    norm_position: str = option(
        "before", "normalise before the ReLU or after it", checks.choice,
        choices=NORM_POSITIONS, neutral="before", beyond=True)
    residual: bool = option(False, "residual connections between hidden layers of equal "
                            "width", checks.boolean, neutral=False, beyond=True)
    dropout: float = option(0.0, "inverted dropout probability on the hidden layers",
                            checks.fraction, metavar="P", neutral=0.0, beyond=True, member=True)
    label_smoothing: float = option(0.0, "label smoothing ε", checks.fraction, metavar="ε",
                                    neutral=0.0, beyond=True, member=True)
    flip: bool = option(False, "augment: random horizontal flips", checks.boolean,
                        neutral=False, beyond=True)
    translate: int = option(0, "augment: random translations of up to PX pixels (under 16)",
                            _natural, metavar="PX", neutral=0, beyond=True)
    jitter: float = option(0.0, "augment: random contrast (1±J) and brightness (±J)",
                           checks.fraction, metavar="J", neutral=0.0, beyond=True)
    decay_rate: float = option(
        0.1, "schedule step: multiply η by R every --decay-every steps, R in (0, 1]",
        _positive, metavar="R", neutral=0.1, beyond=True, member=True)
    decay_every: int | None = option(
        None, "schedule step: steps between drops (default n_s)", checks.optional(_integer),
        metavar="STEPS", parse=int, neutral=None, beyond=True, member=True)
    warmup_steps: int = option(
        0, "linear warm-up before a constant, step or cosine schedule", _natural,
        metavar="STEPS", neutral=0, beyond=True, member=True)
    precise_bn: int = option(
        0, "after training, recompute the batch-norm statistics over BATCHES training "
        "batches (PreciseBN)", _natural, metavar="BATCHES", neutral=0, beyond=True, member=True)

    pad_mode: str = option(
        "mean", "augment: what translations shift in: mean (0 after standardisation), "
        "reflect or edge", checks.choice, choices=PAD_MODES, neutral="mean", beyond=True)
    mixup: float = option(0.0, "augment: MixUp, weights w ~ Beta(α, α), soft targets (0: off)",
                          _nonnegative, metavar="α", neutral=0.0, beyond=True)
    cutmix: float = option(0.0, "augment: CutMix, weights w ~ Beta(α, α), soft targets (0: off)",
                           _nonnegative, metavar="α", neutral=0.0, beyond=True)
    whiten: str = option(
        "none", "whiten the inputs: zca (every image once, before augmentation) or pca "
        "(every batch, after it); folded into the first layer of the saved model",
        checks.choice, choices=WHITENINGS, neutral="none", beyond=True)
    whiten_eps: float = option(0.01, "whitening: ε added to the covariance's eigenvalues",
                               _positive, metavar="ε", neutral=0.01, beyond=True)
    whiten_components: int | None = option(
        None, "whitening pca: keep the K largest components (default all)",
        checks.optional(_integer), metavar="K", parse=int, neutral=None, beyond=True)
    ema: float = option(
        0.0, "average the weights with this decay (e.g. 0.999; 0: off): the final, saved "
        "network is the average, the plain weights' results are kept beside it",
        checks.fraction, metavar="DECAY", neutral=0.0, beyond=True)

    data_seed: int | None = option(
        None, "seed of the data order, the augmentation and the mixing (default: --seed); "
        "the members of a population share it", checks.optional(_natural), metavar="SEED",
        parse=int, neutral=None, beyond=True)

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

    @property
    def stream_seed(self) -> int:
        """The seed of the data order, augmentation and mixing: ``data_seed``, or ``seed``
        when it is None."""
        return self.seed if self.data_seed is None else self.data_seed

    def shared_options(self) -> tuple:
        """What the members of a population must share (:data:`SHARED`): configs with
        equal values can train as one population."""
        return tuple(getattr(self, name) for name in SHARED)

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
        except IsADirectoryError:
            raise UserError(f"config file {path} is a folder; give a .toml file") from None
        except OSError as exc:
            raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a TOML file (not UTF-8 text)") from None
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict(options)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

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
    """Check every option with its field's check, then the rules that tie options
    together; return the normalised values (tuples, floats, str paths)."""
    values = {}
    for f in dataclasses.fields(c):
        try:
            values[f.name] = f.metadata["check"](getattr(c, f.name), f.name)
        except UserError as exc:
            raise UserError(f"config: {exc}") from None
    _cross_checks(values)
    return values


def _cross_checks(v: dict) -> None:
    """The rules that involve more than one option."""
    if v["batch_norm"] and v["hidden_sizes"] and v["batch_size"] < BN_MIN_BATCH:
        raise UserError(f"config: batch_size must be an integer >= {BN_MIN_BATCH} with batch "
                        f"norm (batch statistics need two examples), got {v['batch_size']}")
    if v["batch_norm"] and v["layer_norm"]:
        raise UserError("config: batch_norm and layer_norm are alternatives; set "
                        "batch_norm = false to use layer_norm")
    if v["precise_bn"] and not (v["batch_norm"] and v["hidden_sizes"]):
        raise UserError("config: precise_bn recomputes batch-norm statistics; it needs "
                        "batch_norm = true and a hidden layer")
    if v["translate"] >= 16:
        raise UserError(f"config: translate must be under 16 pixels, got {v['translate']}")
    if v["decay_rate"] > 1:
        raise UserError(f"config: decay_rate must be in (0, 1], got {v['decay_rate']}")
    if v["warmup_steps"] and v["schedule"] == "cyclic":
        raise UserError("config: warmup_steps does not apply to the cyclic schedule, which "
                        "starts at eta_min already; set it to 0 or choose another schedule")
    if v["warmup_steps"] >= v["cycles"] * 2 * v["n_s"]:
        raise UserError(f"config: warmup_steps ({v['warmup_steps']}) must be fewer than "
                        f"the {v['cycles'] * 2 * v['n_s']} training steps")
    if v["pad_mode"] != "mean" and not v["translate"]:
        raise UserError(f"config: pad_mode {v['pad_mode']!r} says how translations pad; "
                        "set translate too, or leave pad_mode at mean")
    if v["whiten_components"] is not None and v["whiten"] != "pca":
        raise UserError("config: whiten_components applies to whiten = \"pca\"; set "
                        "whiten = \"pca\" or leave whiten_components out")
    if v["whiten"] == "none" and v["whiten_eps"] != 0.01:
        raise UserError("config: whiten_eps applies to whitening; set whiten = \"zca\" or "
                        "\"pca\", or leave whiten_eps out")
    if v["eta_min"] > v["eta_max"]:
        raise UserError(f"config: eta_min ({v['eta_min']}) must not exceed "
                        f"eta_max ({v['eta_max']})")


def _reject_unknown(options: dict, what: str) -> None:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(options) - set(known), key=str)
    if unknown:
        raise UserError(f"unknown config {what}(s) {', '.join(map(str, unknown))}; "
                        f"allowed: {', '.join(known)}")


# --- command-line flags -----------------------------------------------------------------


def flag_name(name: str) -> str:
    """The flag of option ``name``: ``--lambda`` for lam, ``--n-s`` for n_s."""
    f = _FIELDS[name]
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def add_option_flags(parser, beyond=None, skip=(), show_defaults: bool = True) -> None:
    """One flag per option of :class:`TrainConfig` (except ``skip``), on ``parser`` (an
    ArgumentParser or argument group; options marked ``beyond`` go to ``beyond`` if
    given). Every flag defaults to None: unset flags leave the configuration alone
    (see :func:`flags_given`). A value is checked as it is parsed, so a bad one is an
    error that names its flag. ``show_defaults``: end each help text with the default."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        m = f.metadata
        target = beyond if (m["beyond"] and beyond is not None) else parser
        help_text = m["help"] + (_default_text(f) if show_defaults else "")
        if isinstance(f.default, bool):
            target.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text,
                                action=argparse.BooleanOptionalAction)
        else:
            target.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text,
                                choices=m["choices"], metavar=m["metavar"],
                                type=None if m["choices"] else checks.flag_type(
                                    m["check"], f.name, m["parse"] or type(f.default)))


def flags_given(args, skip=()) -> dict:
    """{option: value} of the option flags set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def _default_text(f) -> str:
    if f.default is None or "default" in f.metadata["help"]:
        return ""
    if isinstance(f.default, bool):
        return f" (default {'on' if f.default else 'off'})"
    if isinstance(f.default, tuple):
        return f" (default {','.join(map(str, f.default))})"
    return f" (default {f.default})"


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


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# options the members of a population must share (all but those marked ``member``)
SHARED_OPTIONS = tuple(name for name, f in _FIELDS.items()
                       if not f.metadata["member"] and name != "data_seed")
SHARED = (*SHARED_OPTIONS, "total_steps", "stream_seed")  # and the steps, the data stream


def check_population(configs) -> None:
    """Raise a one-line error naming the first option the members of a population must
    share (see :data:`SHARED`) on which ``configs`` differ."""
    if not configs:
        raise UserError("a population needs at least one config")
    first = configs[0]
    for k, config in enumerate(configs[1:], 1):
        for name in SHARED:
            if getattr(config, name) != getattr(first, name):
                what = "data_seed (or seed)" if name == "stream_seed" else name
                raise UserError(f"population configs must share {what}: member 0 has "
                                f"{getattr(first, name)!r}, member {k} has "
                                f"{getattr(config, name)!r}")
