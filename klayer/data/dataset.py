"""Splitting and standardising CIFAR-10 into the arrays a network trains on.

:func:`load_data` is what training, search, studies and evaluation call: it takes the
data options of a :class:`klayer.config.TrainConfig`. :func:`load_cifar10` is the same
with the options spelled out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klayer.nn import checks
from klayer.data.batches import (
    BATCH_NAMES, CLASS_NAMES, IMAGES_PER_BATCH, TEST_BATCH, TRAIN_BATCHES, batch_files,
    check_batch, read_batch,
)
from klayer.data.locate import ensure_cifar10
from klayer.data.standardize import Standardizer
from klayer.nn.errors import UserError

PROTOCOLS = ("full", "single")
TRAIN_IMAGES = len(TRAIN_BATCHES) * IMAGES_PER_BATCH


@dataclass(eq=False)
class Dataset:
    """Standardised splits: X_* (n, 3072) float32/float64, y_* (n,) int64."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    standardizer: Standardizer
    class_names: tuple = CLASS_NAMES

    @property
    def input_size(self) -> int:
        return self.X_train.shape[1]


def split_ranges(protocol: str, n_val: int, subset: int | None) -> dict[str, tuple[int, int]]:
    """Rows start:stop of each split: "train" and "val" in the 50,000 training images in
    batch order, "test" in the test batch (see :func:`load_cifar10`)."""
    cap = subset if subset is not None else TRAIN_IMAGES
    if protocol == "full":
        n_train = TRAIN_IMAGES - n_val
        train, val = (0, min(n_train, cap)), (n_train, n_train + min(n_val, cap))
    else:
        train = (0, min(IMAGES_PER_BATCH, cap))
        val = (IMAGES_PER_BATCH, IMAGES_PER_BATCH + min(IMAGES_PER_BATCH, cap))
    return {"train": train, "val": val, "test": (0, min(IMAGES_PER_BATCH, cap))}


def _spanned(start: int, stop: int):
    """(batch name, lo, hi) of the training batches that rows start:stop span."""
    for i, name in enumerate(TRAIN_BATCHES):
        lo = max(start - i * IMAGES_PER_BATCH, 0)
        hi = min(stop - i * IMAGES_PER_BATCH, IMAGES_PER_BATCH)
        if lo < hi:
            yield name, lo, hi


def _labels(parts) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def load_cifar10(
    data_dir=None,
    protocol: str = "full",
    n_val: int = 5000,
    subset: int | None = None,
    dtype="float32",
    download: bool = True,
    progress=False,
) -> Dataset:
    """Load, split and standardise CIFAR-10.

    protocol "full": training batches 1-5 with their last ``n_val`` images (0..49999) as
    validation, test batch as test (45000/5000/10000 by default). "single": batch 1
    train, batch 2 validation, test batch test (10000 each; ``n_val`` is ignored).
    subset: keep only the first ``subset`` images of each split (train, val and test),
    for quick runs. Only the batches needed are decoded; the others are checked without
    decoding (:func:`klayer.data.batches.check_batch`), so every load validates all six.
    Standardisation statistics come from the (possibly subset) training split only.
    """
    checks.choice(protocol, "protocol", PROTOCOLS)
    n_val = checks.integer(n_val, "n_val", 0, TRAIN_IMAGES - 1)
    if subset is not None:
        subset = checks.integer(subset, "subset", 1)
    dt = checks.dtype(dtype)

    files = batch_files(ensure_cifar10(data_dir, download=download, progress=progress))
    ranges = split_ranges(protocol, n_val, subset)
    decoded = {name for split in ("train", "val") for name, _, _ in _spanned(*ranges[split])}
    for name in BATCH_NAMES:
        if name not in decoded and name != TEST_BATCH:
            check_batch(files[name])
    batches = {name: read_batch(files[name]) for name in sorted(decoded) + [TEST_BATCH]}

    def rows(split):
        spans = list(_spanned(*ranges[split]))
        return ([batches[name][0][lo:hi] for name, lo, hi in spans],
                [batches[name][1][lo:hi] for name, lo, hi in spans])

    X_train, y_train = rows("train")
    X_val, y_val = rows("val")
    start, stop = ranges["test"]
    X_test, y_test = batches[TEST_BATCH][0][start:stop], batches[TEST_BATCH][1][start:stop]

    standardizer = Standardizer.fit(X_train)
    return Dataset(
        X_train=standardizer.transform(X_train, dt),
        y_train=_labels(y_train),
        X_val=standardizer.transform(X_val, dt),
        y_val=_labels(y_val),
        X_test=standardizer.transform(X_test, dt),
        y_test=y_test.copy(),
        standardizer=standardizer,
        class_names=CLASS_NAMES,
    )


def load_data(config, progress=False, download: bool = True) -> Dataset:
    """The data a :class:`klayer.config.TrainConfig` trains on: :func:`load_cifar10` with
    its ``data_dir``, ``protocol``, ``n_val``, ``subset`` and ``dtype``.

    download: False where many processes load at once (search workers); locate the data
    once before with :func:`klayer.data.ensure_cifar10` and pass its result as data_dir.
    """
    return load_cifar10(config.data_dir, protocol=config.protocol, n_val=config.n_val,
                        subset=config.subset, dtype=config.dtype, download=download,
                        progress=progress)


def cifar_problem(dims: int, samples: int, data_dir=None):
    """The first ``samples`` CIFAR-10 training images, their first ``dims`` standardised
    dimensions, float64, and their labels (the data must be present: no download)."""
    data = load_cifar10(data_dir, protocol="single", subset=max(samples, 100),
                        dtype="float64", download=False)
    if not 1 <= dims <= data.input_size:
        raise UserError(f"dims must be in [1, {data.input_size}] for CIFAR-10, got {dims}")
    return data.X_train[:samples, :dims].copy(), data.y_train[:samples].copy()
