"""Summaries of CIFAR-10: images per class and per-channel pixel statistics."""

from __future__ import annotations

import numpy as np

from klayer.data.batches import BATCH_NAMES, CLASS_NAMES, NUM_CLASSES, TEST_BATCH, TRAIN_BATCHES
from klayer.data.dataset import Dataset
from klayer.data.standardize import CHUNK_ROWS, Standardizer, pixel_sums
from klayer.nn.errors import UserError


def _split_summary(y: np.ndarray, s1: np.ndarray, s2: np.ndarray, n: int) -> dict:
    """Counts per class and per-channel mean/std from per-column Σx, Σx² in [0, 1]."""
    count = n * (s1.size // 3)
    c1 = s1.reshape(3, -1).sum(axis=1)
    c2 = s2.reshape(3, -1).sum(axis=1)
    mean = c1 / count if count else np.full(3, np.nan)
    std = np.sqrt(np.maximum(c2 / count - mean**2, 0.0)) if count else np.full(3, np.nan)
    return {
        "n": int(n),
        "counts": np.bincount(y, minlength=NUM_CLASSES).tolist(),
        "mean": mean.tolist(),
        "std": std.tolist(),
    }


def _pixel_summary(X: np.ndarray, y: np.ndarray) -> dict:
    s1, s2 = pixel_sums([X])
    return _split_summary(y, s1 / 255.0, s2 / 255.0**2, len(X))


def _standardized_summary(X: np.ndarray, y: np.ndarray, st: Standardizer) -> dict:
    """Undo the standardisation chunk by chunk (x * std + mean) to get [0, 1] statistics."""
    s1 = np.zeros(X.shape[1])
    s2 = np.zeros(X.shape[1])
    std = np.where(st.std > 0, st.std, 1.0)
    for start in range(0, len(X), CHUNK_ROWS):
        chunk = X[start : start + CHUNK_ROWS] * std + st.mean
        s1 += chunk.sum(axis=0)
        s2 += np.einsum("ij,ij->j", chunk, chunk)
    return _split_summary(y, s1, s2, len(X))


def describe(data) -> dict:
    """Counts per class and per-channel (R, G, B) mean and std of the pixels in [0, 1].

    data: the dict of :func:`load_batches` (splits "train" = batches 1-5, "test") or a
    :class:`Dataset` (splits "train", "val", "test", statistics of the original pixels
    recovered from the standardised arrays). Returns
    ``{"class_names": [...], "splits": {split: {"n", "counts", "mean", "std"}}}``.
    """
    if isinstance(data, Dataset):
        arrays = {
            "train": (data.X_train, data.y_train),
            "val": (data.X_val, data.y_val),
            "test": (data.X_test, data.y_test),
        }
        splits = {
            name: _standardized_summary(X, y, data.standardizer)
            for name, (X, y) in arrays.items()
        }
        return {"class_names": list(data.class_names), "splits": splits}
    missing = [n for n in BATCH_NAMES if n not in data]
    if missing:
        raise UserError(f"describe needs all six batches, missing {missing}")
    train_y = np.concatenate([data[n][1] for n in TRAIN_BATCHES])
    s1, s2 = pixel_sums([data[n][0] for n in TRAIN_BATCHES])
    return {
        "class_names": list(CLASS_NAMES),
        "splits": {
            "train": _split_summary(train_y, s1 / 255.0, s2 / 255.0**2, len(train_y)),
            "test": _pixel_summary(*data[TEST_BATCH]),
        },
    }
