"""Memory a training run will need, known before any of it is spent.

:func:`estimate` counts, from the configuration alone, the bytes of the arrays a run
holds at its peak: the parameters, their gradients, the optimizer's state, the forward
caches of one mini-batch (kept for the backward pass), those of one evaluation chunk,
and the three data splits. :func:`check_fits` compares the sum with what the machine has
free (:func:`available_bytes`), so that ``klayer train --hidden 10000000`` stops at once
with one line instead of swapping or being killed halfway.

The counts are of the large arrays only (Python objects, NumPy temporaries of a single
operation and the libraries themselves come on top): a lower bound, close for big runs,
which are the ones that matter here.
"""

from __future__ import annotations

import os
from decimal import Decimal

import numpy as np

from klayer.nn.errors import UserError

CIFAR_TRAIN = 50_000  # images in the five training batches
CIFAR_BATCH = 10_000  # images in one batch (the test set, a single-protocol split)
EVAL_CHUNK = 10_000  # rows per forward pass when evaluating (Network.scores)

# Arrays of shape (n, m_l) kept per hidden layer and example: the affine output, the
# normalized values (batch/layer norm cache), the normalization's output and the ReLU
# output; dropout adds its mask and its output. The backward pass adds two more
# (the incoming and the outgoing gradient), alive one layer at a time.
_TRAIN_ARRAYS_PER_UNIT = 4
_DROPOUT_ARRAYS_PER_UNIT = 2
_BACKWARD_ARRAYS = 2
# Scores, probabilities and their gradient: (n, C) each.
_SCORE_ARRAYS = 3
# Optimizer state, in copies of the parameters (the update's scratch array comes on top).
_OPTIMIZER_COPIES = {"sgd": 0, "momentum": 1, "adam": 2}


def split_sizes(config) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) that ``config`` loads from CIFAR-10 (see load_cifar10)."""
    if config.protocol == "full":
        sizes = [CIFAR_TRAIN - config.n_val, config.n_val, CIFAR_BATCH]
    else:
        sizes = [CIFAR_BATCH] * 3
    if config.subset is not None:
        sizes = [min(n, config.subset) for n in sizes]
    return tuple(max(n, 0) for n in sizes)


def estimate(config, n_train: int | None = None, input_size: int = 3072,
             num_classes: int = 10, n_val: int | None = None,
             n_test: int | None = None) -> dict:
    """Bytes of each part of a run of ``config`` (a :class:`klayer.config.TrainConfig`).

    n_train, n_val, n_test: the split sizes (default: what the configuration loads from
    CIFAR-10). Returns {"parameters", "gradients", "optimizer", "batch_activations",
    "eval_activations", "data"} in bytes (Python ints: no overflow for absurd widths).
    """
    default = split_sizes(config)
    n_train = default[0] if n_train is None else n_train
    n_val = default[1] if n_val is None else n_val
    n_test = default[2] if n_test is None else n_test
    item = np.dtype(config.dtype).itemsize
    sizes = [input_size, *config.hidden_sizes, num_classes]
    normalised = config.batch_norm or config.layer_norm
    n_params = sum(m * (d + 1) + (2 * m if normalised and l < len(sizes) - 1 else 0)
                   for l, (d, m) in enumerate(zip(sizes, sizes[1:]), start=1))
    hidden_units = sum(config.hidden_sizes)
    widest = max(sizes[1:])
    per_unit = _TRAIN_ARRAYS_PER_UNIT + (_DROPOUT_ARRAYS_PER_UNIT if config.dropout else 0)
    batch = config.batch_size
    batch_values = (batch * (per_unit * hidden_units + _SCORE_ARRAYS * num_classes
                             + _BACKWARD_ARRAYS * widest)
                    + 2 * batch * input_size)  # the batch's rows, and an augmented copy
    chunk = min(EVAL_CHUNK, max(n_train, n_val, n_test, 1))
    eval_values = chunk * (_TRAIN_ARRAYS_PER_UNIT * hidden_units
                           + _SCORE_ARRAYS * num_classes)
    return {
        "parameters": n_params * item,
        "gradients": n_params * item,
        "optimizer": (_OPTIMIZER_COPIES.get(config.optimizer, 2) + 1) * n_params * item,
        "batch_activations": batch_values * item,
        "eval_activations": eval_values * item,
        "data": (n_train + n_val + n_test) * input_size * item,
    }


def available_bytes() -> int | None:
    """Memory free for a new process: MemAvailable of /proc/meminfo (Linux), else the
    free physical pages; None when neither is known (then nothing is checked)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(estimate: dict, what: str, available: int | None = None) -> None:
    """Raise ValueError (one line) if the parts of ``estimate`` add up to more than the
    memory available (``available`` bytes, default :func:`available_bytes`)."""
    available = available_bytes() if available is None else available
    need = sum(estimate.values())
    if available is None or need <= available:
        return
    largest = max(estimate, key=estimate.get)
    raise UserError(f"{what} needs ~{_gib(need)} GiB (of which {largest.replace('_', ' ')} "
                    f"{_gib(estimate[largest])} GiB), {_gib(available)} GiB available; "
                    f"reduce --hidden / --batch-size / --subset or use --dtype float32")


def _gib(n: int) -> str:
    """Bytes in GiB, three significant digits (exact for ints of any size)."""
    return format(Decimal(n) / 2**30, ".3g")
