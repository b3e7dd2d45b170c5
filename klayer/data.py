"""CIFAR-10: find or download it, read it without running code from the files, validate
it, split it and standardise it.

Images are rows of 3072 uint8 values (1024 red, 1024 green, 1024 blue, each 32x32
row-major), labels are int64 in 0..9. Preprocessing: x -> (x / 255 - mean) / std per
dimension, with mean and std of the training split (kept in a :class:`Standardizer` so a
trained model can be applied to new images).

Where the data is looked for: an explicit ``data_dir``, else the ``KLAYER_DATA``
environment variable, else the user cache (``$XDG_CACHE_HOME/klayer`` or
``~/.cache/klayer``). The first of these that is given decides; the others are not
consulted, so a mistyped path never silently picks up other data. That folder may be
``cifar-10-batches-py`` (or ``-bin``) itself or contain it.

All errors about the files are :class:`DataError` (a ``ValueError``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)
NUM_CLASSES = 10
IMAGE_SIZE = 3072  # 3 channels x 32 x 32
IMAGES_PER_BATCH = 10000
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
BATCH_NAMES = TRAIN_BATCHES + (TEST_BATCH,)
PY_FOLDER = "cifar-10-batches-py"
BIN_FOLDER = "cifar-10-batches-bin"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ENV_VAR = "KLAYER_DATA"
PROTOCOLS = ("full", "single")

_CHUNK_ROWS = 64  # rows per chunk in the statistics and transform loops (<= 1.5 MB: in cache)


class DataError(ValueError):
    """The CIFAR-10 files are missing, incomplete, corrupt or not what they claim to be."""


# --------------------------------------------------------------------------- locating


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/klayer`` if that variable is set, else ``~/.cache/klayer``."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "klayer"


def data_root(data_dir=None) -> tuple[Path, str]:
    """The folder to look in (and download into), and where that choice came from:
    ``"data_dir"`` (explicit argument), ``"KLAYER_DATA"`` or ``"cache"``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "data_dir"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), ENV_VAR
    return default_cache_dir(), "cache"


def _batches_folder(folder: Path) -> Path | None:
    """``folder`` if it holds any batch file, else its ``cifar-10-batches-py`` (or -bin)
    subfolder if that does, else None."""
    for candidate in (folder, folder / PY_FOLDER, folder / BIN_FOLDER):
        if len(_missing_batches(candidate)) < len(BATCH_NAMES):
            return candidate
    return None


def find_data_dir(data_dir=None) -> Path | None:
    """The folder holding the CIFAR-10 batch files, or None if there is none where
    :func:`data_root` points."""
    return _batches_folder(data_root(data_dir)[0])


def download_target(data_dir=None) -> Path:
    """Where :func:`ensure_cifar10` unpacks the python version if it is absent: the
    ``cifar-10-batches-py`` folder inside :func:`data_root`, or that root itself if it is
    named so."""
    root = data_root(data_dir)[0]
    return root if root.name in (PY_FOLDER, BIN_FOLDER) else root / PY_FOLDER


# --------------------------------------------------------------------------- download


def _manual_instructions(root: Path, url: str) -> str:
    return (
        f"To install CIFAR-10 by hand, download {url} on any machine, unpack it "
        f"(tar xzf cifar-10-python.tar.gz) and put the folder so that "
        f"{root / PY_FOLDER / 'data_batch_1'} exists; or point --data-dir or "
        f"${ENV_VAR} at a folder that holds (or is) {PY_FOLDER}."
    )


def ensure_cifar10(
    data_dir=None,
    download: bool = True,
    url: str = OFFICIAL_URL,
    md5: str = OFFICIAL_MD5,
    progress=True,
) -> Path:
    """The folder holding the CIFAR-10 batches; downloads and unpacks it if absent.

    The tarball is streamed into a temporary file beside the target, its md5 checked,
    unpacked into a temporary folder (``tarfile`` "data" filter: no absolute paths,
    links out of the folder or special files) and only then renamed into place, so an
    interrupted or corrupt download never leaves a folder that a later run would trust.
    progress: True for a tqdm bar on stderr, False for none, or a callable
    ``progress(bytes_done, bytes_total_or_None)``.
    """
    root, _ = data_root(data_dir)
    found = _batches_folder(root)
    if found is not None:
        return found
    if not download:
        raise DataError(
            f"CIFAR-10 not found in {root} (downloading is switched off). "
            + _manual_instructions(root, url)
        )
    target = download_target(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".cifar-10-download-", dir=target.parent))
    try:
        tarball = work / "cifar-10-python.tar.gz"
        _download(url, tarball, md5, progress, root)
        unpacked = _unpack(tarball, work / "unpacked")
        if target == root / PY_FOLDER:  # name it after what the archive held (-py or -bin)
            target = root / unpacked.name
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder of the right name: replace it
        try:
            os.rename(unpacked, target)
        except OSError:
            if _batches_folder(target) is None:  # not a concurrent download that won
                raise DataError(f"cannot move the unpacked data to {target}: it exists")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _download(url: str, path: Path, md5: str, progress, root: Path) -> None:
    """Stream ``url`` into ``path``, checking the length and the md5 on the way."""
    digest = hashlib.md5()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(path, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            report = _progress_reporter(progress, total, Path(url).name or "download")
            try:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    report(len(chunk), received)
            finally:
                report(None, received)
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(
            f"could not download {url}: {exc}. " + _manual_instructions(root, url)
        ) from exc
    if total is not None and received != total:
        raise DataError(
            f"download of {url} was interrupted: received {received} of {total} bytes. "
            "Nothing was kept; run again to retry."
        )
    if digest.hexdigest() != md5.lower():
        raise DataError(
            f"md5 of the file downloaded from {url} is {digest.hexdigest()}, expected "
            f"{md5}: the file is corrupt or not CIFAR-10, and was discarded. "
            + _manual_instructions(root, url)
        )


def _progress_reporter(progress, total, name):
    """A function ``report(step, done)``; ``step=None`` closes the report."""
    if callable(progress):
        return lambda step, done: progress(done, total) if step is not None else None
    if not progress:
        return lambda step, done: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    return lambda step, done: bar.update(step) if step is not None else bar.close()


def _unpack(tarball: Path, dest: Path) -> Path:
    """Extract ``tarball`` into ``dest`` safely; return the batches folder inside it."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python without extraction filters: refuse anything unusual
                for member in tar.getmembers():
                    name = Path(member.name)
                    if name.is_absolute() or ".." in name.parts or not (
                        member.isfile() or member.isdir()
                    ):
                        raise DataError(f"refusing tar member {member.name!r}")
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot unpack the downloaded archive: {exc}") from exc
    for folder in (dest / PY_FOLDER, dest / BIN_FOLDER):
        missing = _missing_batches(folder)
        if folder.is_dir() and not missing:
            return folder
    raise DataError(
        f"the downloaded archive holds no complete {PY_FOLDER} or {BIN_FOLDER} folder"
    )


# --------------------------------------------------------------------------- reading


def _reconstruct_functions():
    """The functions NumPy's own pickles call to rebuild arrays and scalars."""
    array = np.zeros(1, np.uint8)
    return {
        "_reconstruct": array.__reduce__()[0],  # protocol <= 4 arrays
        "_frombuffer": array.__reduce_ex__(5)[0],  # protocol 5 arrays
        "scalar": np.uint8(0).__reduce__()[0],  # numpy scalars
    }


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 uses it to pickle bytes with protocol <= 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _allowed_globals() -> dict:
    """(module, name) -> object: everything a CIFAR-10 pickle may refer to."""
    fn = _reconstruct_functions()
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = fn["_reconstruct"]
        allowed[(f"{core}.multiarray", "scalar")] = fn["scalar"]
        allowed[(f"{core}.numeric", "_frombuffer")] = fn["_frombuffer"]
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, strings, numbers and NumPy arrays, and
    nothing else: any other global (the way a pickle runs code) raises DataError before
    it can be called."""

    _allowed = _allowed_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refused to load {module}.{name}: not part of the CIFAR-10 format "
                "(the file may have been tampered with)"
            ) from None

    def persistent_load(self, pid):
        raise DataError("refused a persistent id: not part of the CIFAR-10 format")


def _field(batch: dict, key: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise DataError(f"no {key!r} entry (keys: {sorted(map(str, batch))})")


def _as_images(data, n: int) -> np.ndarray:
    """data (ndarray, list or bytes) -> (n, 3072) uint8, or DataError saying what is wrong."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, np.uint8)
    elif not isinstance(data, np.ndarray):
        try:
            data = np.asarray(data)
        except (ValueError, TypeError) as exc:
            raise DataError(f"'data' is not an array of pixels: {exc}") from exc
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu":
            raise DataError(f"'data' has dtype {data.dtype}, expected uint8")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError("'data' holds values outside 0..255")
        data = data.astype(np.uint8)
    if data.ndim == 1 and data.size == n * IMAGE_SIZE:
        data = data.reshape(n, IMAGE_SIZE)
    if data.shape != (n, IMAGE_SIZE):
        raise DataError(f"'data' has shape {data.shape}, expected ({n}, {IMAGE_SIZE})")
    return np.ascontiguousarray(data)


def _as_labels(labels, n: int) -> np.ndarray:
    """labels (list, ndarray or bytes) -> (n,) int64 in 0..9, or DataError."""
    if isinstance(labels, (bytes, bytearray)):
        labels = np.frombuffer(labels, np.uint8)
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"'labels' is not a list of integers: {exc}") from exc
    if labels.dtype.kind not in "iu":
        raise DataError(f"'labels' has dtype {labels.dtype}, expected integers")
    if labels.shape != (n,):
        raise DataError(f"'labels' has shape {labels.shape}, expected ({n},)")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        raise DataError(f"'labels' outside 0..9 ({bad.size} of them, e.g. {bad[0]})")
    return labels.astype(np.int64)


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError) as exc:
        raise DataError(f"truncated or corrupt pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"holds a {type(batch).__name__}, expected a dict")
    return _as_images(_field(batch, "data"), IMAGES_PER_BATCH), _as_labels(
        _field(batch, "labels"), IMAGES_PER_BATCH
    )


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """10000 records of 1 label byte followed by 3072 pixel bytes."""
    expected = IMAGES_PER_BATCH * (1 + IMAGE_SIZE)
    size = path.stat().st_size
    if size != expected:
        raise DataError(f"is {size} bytes, expected {expected} (10000 records of 3073 bytes)")
    records = np.fromfile(path, np.uint8).reshape(IMAGES_PER_BATCH, 1 + IMAGE_SIZE)
    return np.ascontiguousarray(records[:, 1:]), _as_labels(records[:, 0], IMAGES_PER_BATCH)


def read_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file (pickle, or binary if its name ends in .bin) ->
    (X: (10000, 3072) uint8, y: (10000,) int64). DataError names the file and the problem."""
    path = Path(path)
    try:
        if path.suffix == ".bin":
            return _read_binary_batch(path)
        return _read_pickle_batch(path)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _missing_batches(folder: Path) -> list[str]:
    """Names of the six batches absent from ``folder`` in both formats."""
    return [
        name
        for name in BATCH_NAMES
        if not (folder / name).is_file() and not (folder / f"{name}.bin").is_file()
    ]


def batch_files(folder) -> dict[str, Path]:
    """Name -> file of the six batches in ``folder`` (or its cifar-10-batches-py/-bin
    subfolder). Pickles are preferred over .bin files; DataError if any batch is missing."""
    folder = Path(folder)
    folder = _batches_folder(folder) or folder
    missing = _missing_batches(folder)
    if missing:
        raise DataError(
            f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)}; all six of "
            f"{', '.join(BATCH_NAMES)} (or their .bin versions) are needed"
        )
    return {
        name: folder / name if (folder / name).is_file() else folder / f"{name}.bin"
        for name in BATCH_NAMES
    }


def load_batches(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All six batches: ``{"data_batch_1": (X, y), ..., "test_batch": (X, y)}`` with
    X (10000, 3072) uint8 and y (10000,) int64, validated."""
    return {name: read_batch(path) for name, path in batch_files(folder).items()}


# --------------------------------------------------------------------------- preprocessing


def _float_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def _pixel_sums(parts) -> tuple[np.ndarray, np.ndarray]:
    """Per-column Σx and Σx² over the rows of ``parts`` (arrays (n_i, d) of integer pixels
    0..255), as exact float64 (d,).

    Chunks of 64 rows are summed in float32, which is exact there (64 * 255² < 2^24),
    then added up in float64 (exact for any realistic n)."""
    d = parts[0].shape[1]
    s1 = np.zeros(d)
    s2 = np.zeros(d)
    buf = np.empty((_CHUNK_ROWS, d), np.float32)
    for X in parts:
        for start in range(0, len(X), _CHUNK_ROWS):
            rows = X[start : start + _CHUNK_ROWS]
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
            raise ValueError(
                f"mean and std must be 1-D of equal length, got {self.mean.shape} and "
                f"{self.std.shape}"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise ValueError("mean and std must be finite")
        if np.any(self.std < 0):
            raise ValueError("std must be >= 0")

    @classmethod
    def fit(cls, X) -> Standardizer:
        """Statistics of X: (n, d) uint8 pixels (n >= 1), exact in float64. X may also be a
        list of such arrays, taken as their concatenation (without building it)."""
        parts = [np.asarray(p) for p in X] if isinstance(X, (list, tuple)) else [np.asarray(X)]
        n = sum(len(p) for p in parts)
        if n == 0 or any(p.ndim != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
            shapes = [p.shape for p in parts]
            raise ValueError(f"fit needs non-empty (n, d) pixel arrays, got shapes {shapes}")
        s1, s2 = _pixel_sums(parts)
        mean = s1 / (n * 255.0)
        var = np.maximum(s2 / (n * 255.0**2) - mean**2, 0.0)
        return cls(mean, np.sqrt(var))

    def transform(self, X, dtype="float32") -> np.ndarray:
        """X: (n, d) pixels 0..255 -> (n, d) array of ``dtype``, (X / 255 - mean) / std.
        X may also be a list of (n_i, d) arrays, giving their standardised concatenation.

        Computed as X * (1 / (255 std)) - mean / std in ``dtype`` arithmetic, a few rows
        at a time in a small buffer, then written to the output: no float copy of X
        besides the result."""
        dt = _float_dtype(dtype)
        d = self.mean.size
        if isinstance(X, (list, tuple)):
            parts, shape = [np.asarray(p) for p in X], None
        else:
            X = np.asarray(X)
            parts, shape = [X.reshape(-1, d) if X.shape[-1:] == (d,) else X], X.shape
        for p in parts:
            if p.ndim != 2 or p.shape[1] != d:
                raise ValueError(f"X has shape {p.shape}, expected (n, {d})")
        std = np.where(self.std > 0, self.std, 1.0)
        scale = (1.0 / (255.0 * std)).astype(dt)
        shift = (self.mean / std).astype(dt)
        out = np.empty((sum(len(p) for p in parts), d), dt)
        buf = np.empty((_CHUNK_ROWS, d), dt)
        row = 0
        for p in parts:
            for start in range(0, len(p), _CHUNK_ROWS):
                rows = p[start : start + _CHUNK_ROWS]
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
        raise ValueError(f"y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    Y = np.zeros((y.size, num_classes), dtype)
    Y[np.arange(y.size), y] = 1
    return Y


# --------------------------------------------------------------------------- datasets


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


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _training_rows(files: dict, start: int, stop: int, cache: dict):
    """Rows start:stop of the 50,000 training images in batch order, as lists of
    (10000-or-fewer, 3072) uint8 views and their labels, one per batch spanned. Reads only
    those batches (``cache`` keeps batches read for another split)."""
    X_parts, y_parts = [], []
    for i, name in enumerate(TRAIN_BATCHES):
        lo = max(start - i * IMAGES_PER_BATCH, 0)
        hi = min(stop - i * IMAGES_PER_BATCH, IMAGES_PER_BATCH)
        if lo >= hi:
            continue
        if name not in cache:
            cache[name] = read_batch(files[name])
        X_parts.append(cache[name][0][lo:hi])
        y_parts.append(cache[name][1][lo:hi])
    return X_parts, y_parts


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
    seed: int = 0,
) -> Dataset:
    """Load, split and standardise CIFAR-10.

    protocol "full": training batches 1-5 with their last ``n_val`` images (0..49999) as
    validation, test batch as test (45000/5000/10000 by default). "single": batch 1
    train, batch 2 validation, test batch test (10000 each; ``n_val`` is ignored).
    subset: keep only the first ``subset`` images of each split (train, val and test),
    for quick runs; only the batches needed are read.
    Standardisation statistics come from the (possibly subset) training split only.
    seed: accepted for a stable signature; the splits are deterministic and do not use it.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    total_train = len(TRAIN_BATCHES) * IMAGES_PER_BATCH
    n_val = _check_int(n_val, "n_val", 0, total_train - 1)
    if subset is not None:
        subset = _check_int(subset, "subset", 1)
    _check_int(seed, "seed", 0)
    dt = _float_dtype(dtype)

    files = batch_files(ensure_cifar10(data_dir, download=download, progress=progress))
    cap = subset if subset is not None else total_train
    if protocol == "full":
        n_train = total_train - n_val
        train_range = (0, min(n_train, cap))
        val_range = (n_train, n_train + min(n_val, cap))
    else:
        train_range = (0, min(IMAGES_PER_BATCH, cap))
        val_range = (IMAGES_PER_BATCH, IMAGES_PER_BATCH + min(IMAGES_PER_BATCH, cap))
    cache: dict = {}
    X_train, y_train = _training_rows(files, *train_range, cache)
    X_val, y_val = _training_rows(files, *val_range, cache)
    X_test, y_test = read_batch(files[TEST_BATCH])
    X_test, y_test = X_test[:cap], y_test[:cap]

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


# --------------------------------------------------------------------------- summaries


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
    s1, s2 = _pixel_sums([X])
    return _split_summary(y, s1 / 255.0, s2 / 255.0**2, len(X))


def _standardized_summary(X: np.ndarray, y: np.ndarray, st: Standardizer) -> dict:
    """Undo the standardisation chunk by chunk (x * std + mean) to get [0, 1] statistics."""
    s1 = np.zeros(X.shape[1])
    s2 = np.zeros(X.shape[1])
    std = np.where(st.std > 0, st.std, 1.0)
    for start in range(0, len(X), _CHUNK_ROWS):
        chunk = X[start : start + _CHUNK_ROWS] * std + st.mean
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
        raise ValueError(f"describe needs all six batches, missing {missing}")
    train_y = np.concatenate([data[n][1] for n in TRAIN_BATCHES])
    s1, s2 = _pixel_sums([data[n][0] for n in TRAIN_BATCHES])
    return {
        "class_names": list(CLASS_NAMES),
        "splits": {
            "train": _split_summary(train_y, s1 / 255.0, s2 / 255.0**2, len(train_y)),
            "test": _pixel_summary(*data[TEST_BATCH]),
        },
    }
