"""A diagnose case: a small batch-norm problem, in the column or the row convention.

The model (both layouts compute the same function):

    layers l = 1..k-1:  s_l = W_l x_{l-1} + b_l,
                        ŝ_l = (s_l - μ_l) / sqrt(v_l + ε)   (μ_l, v_l: batch mean and the
                                                             biased 1/n batch variance),
                        s̃_l = γ_l ⊙ ŝ_l + β_l,   x_l = max(0, s̃_l)
    layer k:            s_k = W_k x_{k-1} + b_k,  P = softmax(s_k)
    cost                J = (1/n) Σ_i -log P[y_i, i] + λ Σ_l ||W_l||²

columns (DD2424): X is d×n, Y is K×n, W_l is m_l×m_{l-1}, s = W x + b.
rows (cs231n):    X is n×d, Y is n×K, W_l is m_{l-1}×m_l, s = x W + b.

Internally everything is in the core's convention (:mod:`klayer.nn`): X (n, d), W_l
(m_l, m_{l-1}), vectors 1-D. :func:`to_core` and :func:`from_core` convert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klayer.nn import gradcheck as G
from klayer.nn.errors import UserError
from klayer.nn.network import Network

LAYOUTS = ("columns", "rows")
MAT_HINT = "reading and writing .mat files needs SciPy: pip install 'klayer[mat]'"


@dataclass
class Case:
    """A problem in the core's convention (X (n, d), W_l (m_l, m_{l-1}), 1-D vectors)."""

    X: np.ndarray
    y: np.ndarray
    params: dict  # W1, b1, gamma1, beta1, ..., Wk, bk
    lam: float
    eps: float
    layout: str = "columns"
    num_classes: int = field(default=0)

    def __post_init__(self):
        if not self.num_classes:
            self.num_classes = self.params[f"W{self.k}"].shape[0]

    @property
    def k(self) -> int:
        return sum(1 for name in self.params if name.startswith("W"))

    @property
    def sizes(self) -> list[int]:
        return [self.X.shape[1]] + [self.params[f"W{l}"].shape[0] for l in range(1, self.k + 1)]

    @property
    def names(self) -> list[str]:
        """Parameter names in a fixed order: W1, b1, gamma1, beta1, ..., Wk, bk."""
        out = []
        for l in range(1, self.k + 1):
            out += [f"W{l}", f"b{l}"] + ([f"gamma{l}", f"beta{l}"] if l < self.k else [])
        return out

    def network(self, dtype="float64") -> Network:
        """The core's network (float64 unless told) holding a copy of this case's parameters."""
        net = Network(self.X.shape[1], self.sizes[1:-1], self.num_classes, batch_norm=True,
                      dtype=dtype, bn_eps=self.eps)
        net.params = {name: np.array(self.params[name], dtype) for name in self.names}
        return net

    def exact_gradients(self) -> dict:
        """klayer's gradient of the cost (train-mode batch norm), in the core's convention."""
        return self.network().loss(self.X, self.y, self.lam, mode="train").grads


# --- making a case -----------------------------------------------------------------------


def make_case(hidden=(8, 6), dims: int = 10, samples: int = 8, classes: int = 4,
              lam: float = 0.1, layout: str = "columns", seed: int = 0,
              eps: float = 1e-5) -> Case:
    """A small case in which every catalogued bug changes the gradients visibly.

    γ ≠ 1 (a missing γ shows), β ≠ 0 (the ReLU mask of s and of s̃ differ), a small batch
    (1/n and 1/(n-1) differ), λ > 0, rows of W scaled differently (feature variances from
    ~0.01 to ~5, so ε inside or outside the square root differs), and no ReLU input within
    2e-4 of 0 (centred differences stay meaningful). The first seed from ``seed`` on for
    which all of this holds is used.
    """
    if layout not in LAYOUTS:
        raise UserError(f"layout must be columns or rows, got {layout!r}")
    hidden = tuple(int(m) for m in hidden)
    if not hidden:
        raise UserError("a batch-norm case needs at least one hidden layer (--hidden 8,6)")
    if samples < 3:
        raise UserError(f"samples must be at least 3 for batch norm, got {samples}")
    from klayer.diagnose import bugs  # the catalogue decides what "visible" means

    for s in range(seed, seed + 200):
        case = _draw(hidden, dims, samples, classes, lam, layout, s, eps)
        net = case.network()
        if G.relu_margin(net, case.X) <= G.KINK_MARGIN:
            continue
        if bugs.all_visible(case):
            return case
    raise UserError("no seed in 200 tries gives a case in which every bug is visible; "
                    "use more --samples or other --hidden widths")


def _draw(hidden, dims, samples, classes, lam, layout, seed, eps) -> Case:
    rng = np.random.default_rng(seed)
    sizes = [dims, *hidden, classes]
    X = rng.standard_normal((samples, dims))
    y = np.arange(samples) % classes  # every class present
    rng.shuffle(y)
    params = {}
    k = len(sizes) - 1
    for l in range(1, k + 1):
        d, m = sizes[l - 1], sizes[l]
        W = rng.standard_normal((m, d)) * np.sqrt(2.0 / d)
        if l < k:  # a different scale per feature: variances from ~0.01 to ~5
            W *= np.logspace(-1, 0.35, m)[rng.permutation(m)][:, None]
        params[f"W{l}"] = W
        params[f"b{l}"] = 0.1 * rng.standard_normal(m)
        if l < k:
            params[f"gamma{l}"] = rng.uniform(0.5, 1.5, m)
            params[f"beta{l}"] = rng.uniform(-0.5, 0.5, m)
    return Case(X, y.astype(np.int64), params, float(lam), float(eps), layout, classes)


# --- layouts -------------------------------------------------------------------------------


def from_core(case: Case, tensors: dict) -> dict:
    """Core-convention tensors (W (m, d), 1-D vectors) in the case's layout: W transposed
    for rows, vectors as columns (m, 1) for columns and rows (1, m) for rows."""
    out = {}
    for name, value in tensors.items():
        value = np.asarray(value, np.float64)
        if name.startswith("W"):
            out[name] = value.T.copy() if case.layout == "rows" else value.copy()
        else:
            out[name] = value.reshape(-1, 1) if case.layout == "columns" else value.reshape(1, -1)
    return out


def expected_shape(case: Case, name: str) -> tuple:
    m = case.params[name].shape
    if name.startswith("W"):
        return m if case.layout == "columns" else m[::-1]
    return (m[0], 1) if case.layout == "columns" else (1, m[0])


def _shape_words(case: Case, name: str) -> str:
    l = int(re.sub(r"\D", "", name))
    prev = "d" if l == 1 else f"m_{l - 1}"
    this = "K" if l == case.k else f"m_{l}"
    if name.startswith("W"):
        return f"{this} × {prev}" if case.layout == "columns" else f"{prev} × {this}"
    return f"{this}" + (" × 1 or 1-D" if case.layout == "columns" else ", 1 × " + this + " or 1-D")


def grads_to_core(case: Case, grads: dict, what: str = "GRADS") -> dict:
    """The user's gradients in the core's convention, checked: every parameter present,
    finite, of the expected shape. Raises UserError naming the key and the shape."""
    missing = [name for name in case.names if name not in grads]
    if missing:
        raise UserError(f"{what} has no {missing[0]} (expected keys {', '.join(case.names)}; "
                        f"missing: {', '.join(missing)})")
    # the other layout: every W transposed (and at least one W not square)
    Ws = [f"W{l}" for l in range(1, case.k + 1)]
    shapes = {name: np.shape(grads[name]) for name in Ws}
    other = "rows" if case.layout == "columns" else "columns"
    if all(shapes[n] == expected_shape(case, n)[::-1] for n in Ws) \
            and any(shapes[n] != expected_shape(case, n) for n in Ws):
        n = next(n for n in Ws if shapes[n] != expected_shape(case, n))
        raise UserError(f"{what} is in the {other} layout ({n} is "
                        f"{'×'.join(map(str, shapes[n]))}) but the case is {case.layout}: "
                        f"{n} must be {'×'.join(map(str, expected_shape(case, n)))}; transpose "
                        f"every W, or make the case with --layout {other}")
    out = {}
    for name in case.names:
        value = np.asarray(grads[name])
        if value.dtype.kind not in "fiu":
            raise UserError(f"{what}: {name} must be an array of numbers, got dtype {value.dtype}")
        value = value.astype(np.float64)
        want = expected_shape(case, name)
        if name.startswith("W"):
            if value.shape != want:
                hint = "; it looks transposed" if value.shape == want[::-1] else ""
                raise UserError(f"{what}: {name} has shape {'×'.join(map(str, value.shape))}, "
                                f"expected {'×'.join(map(str, want))} ({_shape_words(case, name)}, "
                                f"{case.layout} layout){hint}")
            core = value.T if case.layout == "rows" else value
        else:
            m = case.params[name].shape[0]
            if value.size != m or (value.ndim == 2 and 1 not in value.shape) or value.ndim > 2:
                raise UserError(f"{what}: {name} has shape {'×'.join(map(str, value.shape))}, "
                                f"expected {'×'.join(map(str, want))} or ({m},) "
                                f"({case.layout} layout)")
            core = value.reshape(-1)
        if not np.all(np.isfinite(core)):
            bad = "NaN" if np.isnan(core).any() else "inf"
            raise UserError(f"{what}: {name} contains {bad}; every gradient entry must be a "
                            "finite number")
        out[name] = np.array(core, np.float64)
    return out


def case_arrays(case: Case) -> dict:
    """Everything a case file holds, in the case's layout."""
    n, K = len(case.y), case.num_classes
    Y = np.zeros((n, K))
    Y[np.arange(n), case.y] = 1.0
    arrays = {"X": case.X.T.copy() if case.layout == "columns" else case.X.copy(),
              "Y": Y.T.copy() if case.layout == "columns" else Y,
              "y": case.y.copy()}
    arrays.update(from_core(case, case.params))
    arrays.update({"lam": np.float64(case.lam), "eps": np.float64(case.eps),
                   "layout": np.str_(case.layout)})
    return arrays


# --- files ---------------------------------------------------------------------------------


def save(path, arrays: dict) -> None:
    """arrays to .npz, or to .mat when the name ends in .mat."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        savemat = _scipy_io().savemat
        savemat(str(path), {k: (np.asarray(v) if not isinstance(v, str) else v)
                            for k, v in arrays.items()})
    else:
        if path.suffix.lower() != ".npz":
            raise UserError(f"{path}: the file name must end in .npz or .mat")
        np.savez(path, **arrays)


def load(path, what: str) -> dict:
    """A .npz or .mat file as a dict of arrays (never runs code: no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no file {path}")
    if path.suffix.lower() == ".mat":
        loadmat = _scipy_io().loadmat
        try:
            raw = loadmat(str(path))
        except Exception as exc:  # scipy raises several types for a bad file
            raise UserError(f"{what}: {path} is not a readable .mat file ({exc})") from None
        return {k: v for k, v in raw.items() if not k.startswith("__")}
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError) as exc:
        raise UserError(f"{what}: {path} is not a readable .npz file without pickled objects "
                        f"({' '.join(str(exc).split())})") from None


def _scipy_io():
    try:
        import scipy.io
    except ImportError:
        raise UserError(MAT_HINT) from None
    return scipy.io


def as_dict(source, what: str) -> dict:
    """A path (str/Path) or a mapping of arrays -> dict of arrays."""
    if isinstance(source, (str, Path)):
        return load(source, what)
    if isinstance(source, dict):
        return dict(source)
    raise UserError(f"{what} must be a path to a .npz/.mat file or a dict of arrays, "
                    f"got {type(source).__name__}")


def case_from_arrays(arrays: dict, what: str = "CASE") -> Case:
    """A Case from the arrays of a case file (either layout)."""
    for key in ("X", "y", "W1", "b1", "lam", "eps", "layout"):
        if key not in arrays:
            raise UserError(f"{what} has no {key}: make one with klayer diagnose make-case")
    layout = arrays["layout"]
    layout = str(np.asarray(layout).reshape(-1)[0]).strip() if np.size(layout) else ""
    if layout not in LAYOUTS:
        raise UserError(f"{what}: layout must be columns or rows, got {layout!r}")
    k = 1
    while f"W{k + 1}" in arrays:
        k += 1
    params = {}
    for l in range(1, k + 1):
        keys = [f"W{l}", f"b{l}"] + ([f"gamma{l}", f"beta{l}"] if l < k else [])
        for key in keys:
            if key not in arrays:
                raise UserError(f"{what} has no {key}")
            value = np.asarray(arrays[key], np.float64)
            params[key] = (value.T if layout == "rows" else value) if key.startswith("W") \
                else value.reshape(-1)
    X = np.asarray(arrays["X"], np.float64)
    X = X.T if layout == "columns" else X
    y = np.asarray(arrays["y"]).reshape(-1).astype(np.int64)
    case = Case(np.ascontiguousarray(X), y, params,
                float(np.asarray(arrays["lam"]).reshape(-1)[0]),
                float(np.asarray(arrays["eps"]).reshape(-1)[0]), layout)
    sizes = case.sizes
    for l in range(1, k + 1):
        if params[f"W{l}"].shape != (sizes[l], sizes[l - 1]):
            raise UserError(f"{what}: W{l} does not fit the layer below it "
                            f"(shape {params[f'W{l}'].shape})")
    if len(y) != len(X) or y.min() < 0 or y.max() >= case.num_classes:
        raise UserError(f"{what}: y must hold one 0-based label per example")
    return case


__all__ = ["Case", "make_case", "case_arrays", "case_from_arrays", "grads_to_core",
           "from_core", "save", "load", "as_dict", "LAYOUTS"]
