"""PCA and ZCA whitening of standardised rows, fitted on the training split only.

With μ the mean and C = (1/n) Σ_i (x_i - μ)(x_i - μ)^T = U diag(λ) U^T the covariance
of the n training rows x_i: (d,) (eigenvalues λ_1 >= ... >= λ_d, eigenvectors the
columns of U), a whitening maps x -> (x - μ) M with

    ZCA:  M = U diag(1 / sqrt(λ + ε)) U^T          (d, d), symmetric
    PCA:  M = U_k diag(1 / sqrt(λ_k + ε))          (d, k), the top k components

so the whitened training rows have covariance M^T C M = diag(λ / (λ + ε)) (PCA) or
U diag(λ / (λ + ε)) U^T (ZCA): the identity in every direction whose variance is well
above ε. Of all whitenings (M^T C M = I), ZCA's is the one whose output stays closest
to its input in mean squared distance: whitened images still look like images.

ε, in the units of the standardised data (every pixel has variance 1, so the λ sum to
d = 3072): the spectrum of CIFAR-10 falls steeply. For the 45,000 training rows of the
full protocol, λ_1 = 828, λ_100 = 2.4, λ_1000 = 0.033, λ_2000 = 1.7e-3 and
λ_3072 = 2.2e-5, the level of the 8-bit quantisation noise ((1/255)² / 12 / σ² ≈ 2e-5
per pixel, for pixel standard deviations σ ≈ 0.25 of [0, 1] intensities).
Dividing by sqrt(λ) would blow that noise up two hundredfold. ε = 1e-2 (a hundredth of
one pixel's variance) whitens the 1,405 directions above it, which carry 99.89% of the
variance, and damps the rest smoothly: a direction with λ = ε comes out with variance
1/2, one with λ = ε/100 with variance 1/100. (ε = 1e-1: 644 directions, 98.9%;
ε = 1e-3: 2,176, 99.99%.)

Covariance and eigendecomposition are computed in float64 (the covariance accumulated
as X^T X over chunks of rows, so 45,000 × 3,072 float32 rows never need a float64
copy); :meth:`Whitening.transform` is one matrix product per chunk in the requested
dtype.

With augmentation, flips and translations act on pixels, so they come first: per
mini-batch, augment the standardised rows, then whiten them (one (n, 3072) · (3072,
3072) product for ZCA, 4.8 GFLOP for a batch of 256: more than the training step of
the best MLP itself). Test and validation rows are whitened once.

The cheaper order, for ZCA: whiten every image once and augment the whitened images.
``symmetry`` (a permutation P of the d columns under which the data's distribution is
taken to be invariant, e.g. the left-right mirror) fits the mean and covariance of X
together with its permuted rows, so the ZCA matrix commutes with P: whitening a
mirrored image gives the mirrored whitened image, exactly, and flips may come after
whitening. ZCA filters are local (nearly a convolution), so translations commute with
it up to the border pixels; that approximation is worth measuring before relying on it.

Fitted on fewer rows than inputs (n <= d) the training rows do not span the input
space, and test rows carry directions training never saw, amplified: with ZCA fitted on
2,000 training images, whitened test rows have mean squared norm 3,000 against the
training rows' 1,109. On the 45,000 training images of the full protocol: 1,477 against
1,407 (ε = 1e-2), 744 against 728 (ε = 1e-1).

After training, :meth:`Whitening.fold_into` turns the whitening and the first layer into
one affine layer on the standardised rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klayer.nn.errors import UserError

METHODS = ("zca", "pca")
FIT_CHUNK = 2048  # rows per float64 chunk of X^T X (2048 × 3072 × 8 B = 50 MB)
TRANSFORM_CHUNK = 4096


@dataclass(eq=False)
class Whitening:
    """A fitted whitening x -> (x - mean) @ matrix.

    method: "zca" or "pca"; eps: ε added to the eigenvalues; components: k (PCA;
    None for ZCA, or PCA keeping all d); mean: (d,); matrix: (d, k) (k = d for ZCA);
    eigenvalues: (d,) of the training covariance, largest first (float64).
    Build it with :meth:`fit` (or :meth:`from_arrays` for a stored one).
    """

    method: str
    eps: float
    components: int | None
    mean: np.ndarray
    matrix: np.ndarray
    eigenvalues: np.ndarray

    def __post_init__(self):
        self.method = _check_method(self.method)
        self.eps = _check_eps(self.eps)
        self.mean = np.asarray(self.mean, np.float64)
        self.matrix = np.asarray(self.matrix)
        self.eigenvalues = np.asarray(self.eigenvalues, np.float64)
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        k = d if self.components is None else self.components
        if self.matrix.dtype not in (np.float32, np.float64):
            raise UserError(f"the whitening matrix must be float32 or float64, "
                            f"got {self.matrix.dtype}")
        if d < 1 or self.matrix.shape != (d, k) or self.eigenvalues.shape != (d,):
            raise UserError(f"whitening arrays do not fit together: mean {self.mean.shape}, "
                            f"matrix {self.matrix.shape} (want ({d}, {k})), eigenvalues "
                            f"{self.eigenvalues.shape}")
        if self.method == "zca" and self.components is not None:
            raise UserError("ZCA keeps every direction: components must be None")
        for name in ("mean", "matrix", "eigenvalues"):
            if not np.isfinite(getattr(self, name)).all():
                raise UserError(f"the whitening's {name} is not finite")
        self._cast: dict = {}

    @property
    def input_size(self) -> int:
        return self.matrix.shape[0]

    @property
    def output_size(self) -> int:
        return self.matrix.shape[1]

    @classmethod
    def fit(cls, X, method: str = "zca", eps: float = 1e-2,
            components: int | None = None, symmetry=None) -> "Whitening":
        """Fit on the training rows X: (n, d), n >= 2 (float32 or float64).

        method "zca" or "pca"; eps: ε > 0 (see the module docstring); components: for
        PCA, keep the k largest components (1 <= k <= d; None keeps all d).
        symmetry: None, or a permutation p of range(d) (X[:, p] is the transformed
        data); μ and C are averaged with their permuted copies, as if X's permuted rows
        were part of the training set. ZCA then commutes with it:
        transform(X[:, p]) = transform(X)[:, p].
        """
        method, eps = _check_method(method), _check_eps(eps)
        X = np.asarray(X)
        if X.ndim != 2 or len(X) < 2 or not np.issubdtype(X.dtype, np.floating):
            raise UserError(f"X must be (n, d) floats with n >= 2 rows, got {X.dtype} {X.shape}")
        n, d = X.shape
        if components is not None:
            if method == "zca":
                raise UserError("components applies to PCA; ZCA keeps every direction")
            if isinstance(components, bool) or not isinstance(components, (int, np.integer)) \
                    or not 1 <= components <= d:
                raise UserError(f"components must be a whole number in [1, {d}], "
                                f"got {components!r}")
            components = int(components)
        mean, cov = _mean_and_covariance(X)
        if symmetry is not None:
            p = np.asarray(symmetry)
            if p.shape != (d,) or not np.array_equal(np.sort(p), np.arange(d)):
                raise UserError(f"symmetry must be a permutation of range({d}) (the columns "
                                f"of X), got an array of shape {p.shape}")
            second = cov + np.outer(mean, mean)  # E[x x^T], then that of X and X[:, p]
            second = (second + second[np.ix_(p, p)]) / 2
            mean = (mean + mean[p]) / 2
            cov = second - np.outer(mean, mean)
        eigenvalues, U = np.linalg.eigh(cov)  # ascending
        eigenvalues, U = np.maximum(eigenvalues[::-1], 0.0), U[:, ::-1]  # largest first
        scale = 1.0 / np.sqrt(eigenvalues + eps)
        if method == "zca":
            matrix = (U * scale) @ U.T
            matrix = (matrix + matrix.T) / 2  # symmetric to the last bit
        else:
            k = d if components is None else components
            matrix = U[:, :k] * scale[:k]
        return cls(method, eps, components, mean, np.ascontiguousarray(matrix), eigenvalues)

    def transform(self, X, dtype="float32", chunk: int = TRANSFORM_CHUNK) -> np.ndarray:
        """X: (n, d) -> (n, k) whitened rows in ``dtype``: X M - μ M, one product per
        chunk of rows, computed in ``dtype`` (float32: single-precision products)."""
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise UserError(f"dtype must be float32 or float64, got {dtype!r}")
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.input_size:
            raise UserError(f"X must be (n, {self.input_size}) for this whitening, "
                            f"got {X.shape}")
        if dt not in self._cast:
            self._cast[dt] = (self.matrix.astype(dt), (self.mean @ self.matrix).astype(dt))
        M, shift = self._cast[dt]
        out = np.empty((len(X), self.output_size), dt)
        for start in range(0, len(X), chunk):
            part = out[start:start + chunk]
            with np.errstate(invalid="ignore", over="ignore"):  # reported just below
                np.matmul(X[start:start + chunk].astype(dt, copy=False), M, out=part)
            part -= shift
            # a NaN or ±inf in a row of X makes its whole output row non-finite
            if not np.isfinite(part).all():
                raise UserError("X contains NaN or infinite values; clean or re-standardise "
                                "the data before whitening")
        return out

    def fold_into(self, W, b) -> tuple[np.ndarray, np.ndarray]:
        """A first layer on whitened rows, s = W z + b with z = M^T (x - μ), as one on
        the unwhitened rows x: s = W' x + b' with W' = W M^T, b' = b - W' μ.
        W: (m, k), b: (m,) -> W': (m, d), b': (m,), in W's dtype (computed in float64).
        A trained network folded so needs no whitening to be stored or applied; its
        batch-norm statistics stay valid, as s is unchanged."""
        W, b = np.asarray(W), np.asarray(b)
        if W.ndim != 2 or W.shape[1] != self.output_size or b.shape != (W.shape[0],):
            raise UserError(f"W must be (m, {self.output_size}) and b (m,) to fold this "
                            f"whitening in, got {W.shape} and {b.shape}")
        folded = W.astype(np.float64) @ self.matrix.T
        shift = b - folded @ self.mean
        return folded.astype(W.dtype), shift.astype(b.dtype)

    def to_arrays(self) -> tuple[dict, dict]:
        """``(arrays, meta)``: plain arrays (for ``np.savez``, loaded back with
        ``allow_pickle=False``) and a JSON-able dict, so no pickle is ever needed."""
        arrays = {"mean": self.mean, "matrix": self.matrix, "eigenvalues": self.eigenvalues}
        meta = {"method": self.method, "eps": self.eps, "components": self.components,
                "input_size": self.input_size, "output_size": self.output_size}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "Whitening":
        """The inverse of :meth:`to_arrays`; checks that arrays and meta agree."""
        missing = {"mean", "matrix", "eigenvalues"} - set(arrays) \
            or {"method", "eps", "components"} - set(meta)
        if missing:
            raise UserError(f"stored whitening lacks {sorted(missing)}")
        components = meta["components"]
        w = cls(meta["method"], meta["eps"], None if components is None else int(components),
                arrays["mean"], arrays["matrix"], arrays["eigenvalues"])
        for key, value in (("input_size", w.input_size), ("output_size", w.output_size)):
            if key in meta and meta[key] != value:
                raise UserError(f"stored whitening says {key} {meta[key]}, its arrays {value}")
        return w


def _mean_and_covariance(X) -> tuple[np.ndarray, np.ndarray]:
    """μ (d,) and C = X^T X / n - μ μ^T (d, d), both float64, accumulated in chunks of
    rows (float64 copies of one chunk at a time). Raises on non-finite rows."""
    n, d = X.shape
    total = np.zeros(d)
    gram = np.zeros((d, d))
    for start in range(0, n, FIT_CHUNK):
        part = X[start:start + FIT_CHUNK].astype(np.float64)
        if not np.isfinite(part).all():
            raise UserError("X contains NaN or infinite values; whitening needs finite data")
        total += part.sum(axis=0)
        gram += part.T @ part
    mean = total / n
    cov = gram / n - np.outer(mean, mean)
    return mean, (cov + cov.T) / 2


def _check_method(method):
    if method not in METHODS:
        raise UserError(f"whitening method must be one of {METHODS}, got {method!r}")
    return method


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) \
            or not (np.isfinite(eps) and eps > 0):
        raise UserError(f"whitening eps must be a finite number > 0 (e.g. 1e-2), got {eps!r}")
    return float(eps)
