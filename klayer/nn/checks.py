"""Validators shared by every entry point: one check per kind of value.

Each function takes a value and the name the user knows it by (a config key such as
``n_s``, or an argument of the Python API such as ``input_size``), and returns the value
normalised (an ``int``, a ``float``, a tuple, a NumPy dtype) or raises ``ValueError``
with one line that names it and says what is allowed. :class:`klayer.config.TrainConfig`
declares which check each option uses; :class:`klayer.nn.network.Network`, the data loader
and the command-line flags (through :func:`flag_type`) call the same functions, so no
rule is written twice.

The choices themselves are defined by the modules that implement them (``INITS`` and
``NORM_POSITIONS`` in :mod:`klayer.nn.network`, ``OPTIMIZERS`` in :mod:`klayer.nn.optim`,
``SCHEDULES`` in :mod:`klayer.nn.schedules`, ``PROTOCOLS`` in :mod:`klayer.data`); only the
float types, which several modules accept, are listed here.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re

import numpy as np

from klayer.nn.errors import UserError

DTYPES = ("float32", "float64")


def integer(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An int (or NumPy integer) in [minimum, maximum]; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise UserError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def number(value, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number >= minimum (> minimum when ``strict``)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise UserError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def fraction(value, name: str) -> float:
    """A probability-like number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def boolean(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def widths(value, name: str) -> tuple[int, ...]:
    """A list of positive layer widths (possibly empty: no hidden layer)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise UserError(f"{name} must be a list of positive integers, got {value!r}")
    return tuple(integer(w, f"{name} entries") for w in value)


def parse_widths(text: str, name: str = "hidden_sizes") -> tuple[int, ...]:
    """Layer widths from text: "50,50" -> (50, 50); "" or "none" -> () (no hidden layer).

    Every comma-separated entry must be a positive integer: "50,,50" is an error, not
    (50, 50).
    """
    if text.strip().lower() in ("", "none"):
        return ()
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", part) and int(part) > 0 for part in parts):
        raise UserError(f"{name} must be comma-separated positive integers like 50,50 "
                        f"(empty: no hidden layer), got {text!r}")
    return tuple(int(part) for part in parts)


def optional(check):
    """``check`` that also lets None through (an option that may be unset)."""
    def check_or_none(value, name, **kwargs):
        return None if value is None else check(value, name, **kwargs)
    return check_or_none


def init(value, name: str, inits) -> str | float:
    """A named initialisation from ``inits`` or a number σ > 0 for N(0, σ²) (also given
    as text, "0.01")."""
    if isinstance(value, str) and value in inits:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, bool) and isinstance(value, numbers.Real) \
            and math.isfinite(value) and value > 0:
        return float(value)
    raise UserError(f"{name} must be one of {', '.join(inits)} or a number σ > 0 "
                    f"(weights N(0, σ²)), got {value!r}")


def dtype(value, name: str = "dtype") -> np.dtype:
    """float32 or float64, given as a name or a NumPy dtype; returns the NumPy dtype."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt not in (np.float32, np.float64):
        raise UserError(f"{name} must be one of {', '.join(DTYPES)}; got {value!r}")
    return dt


def path(value, name: str) -> str | None:
    """None, or a non-empty path given as str or ``pathlib.Path``; returned as str."""
    if value is None:
        return None
    if hasattr(value, "__fspath__"):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} must be a folder path, got {value!r}")
    return value


def flag_type(check, name: str, parse=str):
    """An argparse ``type``: text -> parse -> check(value, name). A bad value becomes an
    ``ArgumentTypeError`` carrying the check's message, which argparse prints after the
    flag's name."""
    def convert(text):
        try:
            try:
                value = parse(text)
            except ValueError:
                if parse not in (int, float):
                    raise
                value = text  # the check names the option and says what it allows
            return check(value, name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert
