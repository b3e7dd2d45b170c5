"""Standardisation of pixels, x -> (x / 255 - mean) / std per dimension, and one-hot labels.

The statistics are those of the training split, kept in a :class:`Standardizer` so that a
trained model can be applied to new images. Both the fit and the transform work a few
rows at a time in a small buffer: no float copy of the images besides the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klayer.nn import checks
from klayer.data.batches import NUM_CLASSES
from klayer.nn.errors import UserError

CHUNK_ROWS = 64  # rows per chunk in the statistics and transform loops (<= 1.5 MB: in cache)


def pixel_sums(parts) -> tuple[np.ndarray, np.ndarray]:
    """Per-column Σx and Σx² over the rows of ``parts`` (arrays (n_i, d) of integer pixels
    0..255), as exact float64 (d,).

    Chunks of 64 rows are summed in float32, which is exact there (64 * 255² < 2^24),
    then added up in float64 (exact for any realistic n)."""
    d = parts[0].shape[1]
    s1 = np.zeros(d)
    s2 = np.zeros(d)
    buf = np.empty((CHUNK_ROWS, d), np.float32)
    for X in parts:
        for start in range(0, len(X), CHUNK_ROWS):
            rows = X[start : start + CHUNK_ROWS]
            chunk = buf[: len(rows)]
            np.copyto(chunk, rows, casting="unsafe")
            s1 += chunk.sum(axis=0)
            np.multiply(chunk, chunk, out=chunk)
            s2 += chunk.sum(axis=0)
    return s1, s2


@dataclass(eq=False)
class Standardizer:
    """Per-dimension standardisation x -> (x / 255 - mean) / std of uint8 pixels.

    mean, std: (d,) float64, statistics of the training images scaled to [0, 1] (std is
    the population std, 1/n). A dimension with std 0 is only centred.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        self.mean = np.asarray(self.mean, np.float64)
        self.std = np.asarray(self.std, np.float64)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise UserError(
                f"mean and std must be 1-D of equal length, got {self.mean.shape} and "
                f"{self.std.shape}"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise UserError("mean and std must be finite")
        if np.any(self.std < 0):
            raise UserError("std must be >= 0")

    @classmethod
    def fit(cls, X) -> Standardizer:
        """Statistics of X: (n, d) uint8 pixels (n >= 1), exact in float64. X may also be a
        list of such arrays, taken as their concatenation (without building it)."""
        parts = [np.asarray(p) for p in X] if isinstance(X, (list, tuple)) else [np.asarray(X)]
        n = sum(len(p) for p in parts)
        if n == 0 or any(p.ndim != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
            shapes = [p.shape for p in parts]
            raise UserError(f"fit needs non-empty (n, d) pixel arrays, got shapes {shapes}")
        s1, s2 = pixel_sums(parts)
        mean = s1 / (n * 255.0)
        var = np.maximum(s2 / (n * 255.0**2) - mean**2, 0.0)
        return cls(mean, np.sqrt(var))

    def transform(self, X, dtype="float32") -> np.ndarray:
        """X: (n, d) pixels 0..255 -> (n, d) array of ``dtype``, (X / 255 - mean) / std.
        X may also be a list of (n_i, d) arrays, giving their standardised concatenation.

        Computed as X * (1 / (255 std)) - mean / std in ``dtype`` arithmetic, a few rows
        at a time in a small buffer, then written to the output: no float copy of X
        besides the result."""
        dt = checks.dtype(dtype)
        d = self.mean.size
        if isinstance(X, (list, tuple)):
            parts, shape = [np.asarray(p) for p in X], None
        else:
            X = np.asarray(X)
            parts, shape = [X.reshape(-1, d) if X.shape[-1:] == (d,) else X], X.shape
        for p in parts:
            if p.ndim != 2 or p.shape[1] != d:
                raise UserError(f"X has shape {p.shape}, expected (n, {d})")
        std = np.where(self.std > 0, self.std, 1.0)
        scale = (1.0 / (255.0 * std)).astype(dt)
        shift = (self.mean / std).astype(dt)
        out = np.empty((sum(len(p) for p in parts), d), dt)
        buf = np.empty((CHUNK_ROWS, d), dt)
        row = 0
        for p in parts:
            for start in range(0, len(p), CHUNK_ROWS):
                rows = p[start : start + CHUNK_ROWS]
                chunk = buf[: len(rows)]
                np.copyto(chunk, rows, casting="unsafe")
                np.multiply(chunk, scale, out=chunk)
                np.subtract(chunk, shift, out=out[row : row + len(rows)])
                row += len(rows)
        return out if shape is None else out.reshape(shape)

    def to_dict(self) -> dict:
        """JSON-friendly: ``{"mean": [...], "std": [...]}``."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        return cls(np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64))


def one_hot(y, num_classes: int = NUM_CLASSES, dtype="float64") -> np.ndarray:
    """y: (n,) integers in 0..num_classes-1 -> (n, num_classes) one-hot array."""
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise UserError(f"y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"labels must be in 0..{num_classes - 1}")
    Y = np.zeros((y.size, num_classes), dtype)
    Y[np.arange(y.size), y] = 1
    return Y
