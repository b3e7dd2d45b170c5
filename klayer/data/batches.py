"""The CIFAR-10 batch files: their format, and reading them without running code.

Six batches of 10,000 images each (``data_batch_1`` .. ``data_batch_5``, ``test_batch``),
either as pickles (the python version: a dict with ``data`` (10000, 3072) uint8 and
``labels``, 10000 integers) or as binary files (``<name>.bin``: 10000 records of one
label byte and 3072 pixel bytes). A row holds 1024 red, 1024 green and 1024 blue values,
each plane 32x32 row-major.

Two levels of checking:

- :func:`read_batch` decodes a file with :class:`SafeUnpickler` (which rebuilds NumPy
  arrays and plain containers and refuses everything else) and validates every value;
- :func:`check_batch` validates a file without decoding it: a binary file by its exact
  size, a pickle by walking its opcodes (executing nothing, and seeking over the runs of
  bytes): the stream must be complete up to its STOP and hold one run of exactly
  10000 x 3072 pixel bytes. It reads a few kB and takes milliseconds, so every load
  checks all six files even when it decodes only some (a truncated file is caught).

All errors about the files are :class:`DataError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np

from klayer.nn.errors import UserError

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


class DataError(UserError):
    """The CIFAR-10 files are missing, incomplete, corrupt or not what they claim to be."""


# --------------------------------------------------------------------------- unpickling


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


# --------------------------------------------------------------------------- decoding


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


_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                  IndexError, AttributeError, OverflowError, MemoryError)


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except _PICKLE_ERRORS as exc:
        raise DataError(f"truncated or corrupt pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"holds a {type(batch).__name__}, expected a dict")
    return _as_images(_field(batch, "data"), IMAGES_PER_BATCH), _as_labels(
        _field(batch, "labels"), IMAGES_PER_BATCH
    )


_BINARY_SIZE = IMAGES_PER_BATCH * (1 + IMAGE_SIZE)


def _check_binary_size(path: Path) -> None:
    size = path.stat().st_size
    if size != _BINARY_SIZE:
        raise DataError(f"is {size} bytes, expected {_BINARY_SIZE} (10000 records of 3073 bytes)")


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """10000 records of 1 label byte followed by 3072 pixel bytes."""
    _check_binary_size(path)
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


# --------------------------------------------------------------------------- checking


_PIXEL_BYTES = IMAGES_PER_BATCH * IMAGE_SIZE
# pickletools.opcodes: the opcode table of the pickle format (a public name of the standard
# library, though its documentation only describes dis and genops)
_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
# opcodes whose argument is a length-prefixed run of bytes: the length's struct format
_BYTE_RUNS = {"SHORT_BINSTRING": "<B", "BINSTRING": "<i", "SHORT_BINBYTES": "<B",
              "BINBYTES": "<I", "BINBYTES8": "<Q", "BYTEARRAY8": "<Q"}


def _check_pickle_structure(path: Path) -> None:
    """Walk the opcodes, executing nothing and seeking over runs of bytes: the stream
    must be complete (up to its STOP) and hold one run of 10000 x 3072 pixel bytes."""
    size = path.stat().st_size
    pixels = False
    with open(path, "rb") as f:
        while (code := f.read(1)) != b".":  # STOP
            op = _OPCODES.get(code)
            if op is None:
                where = "ends before its STOP opcode" if not code else \
                    f"unknown opcode {code!r} at byte {f.tell() - 1}"
                raise DataError(f"truncated or corrupt pickle ({where})")
            length = 0
            if op.name in _BYTE_RUNS:  # the pixels: bytes (protocol >= 3, Python 2 files)
                fmt = _BYTE_RUNS[op.name]
                head = f.read(struct.calcsize(fmt))
                length = struct.unpack(fmt, head)[0] if len(head) == struct.calcsize(fmt) else -1
                if length < 0 or f.tell() + length > size:
                    raise DataError(f"truncated or corrupt pickle ({op.name} at byte "
                                    f"{f.tell()} runs past the end of the file)")
                f.seek(length, 1)
            elif op.arg is not None:  # small arguments, or a str (Python 3, protocol <= 2)
                try:
                    arg = op.arg.reader(f)
                except ValueError as exc:
                    raise DataError(f"truncated or corrupt pickle ({exc})") from None
                length = len(arg) if isinstance(arg, (str, bytes, bytearray)) else 0
            pixels = pixels or length == _PIXEL_BYTES
    if not pixels:
        raise DataError(f"holds no block of {IMAGES_PER_BATCH} x {IMAGE_SIZE} pixel bytes: "
                        "not a CIFAR-10 batch")


def check_batch(path) -> None:
    """Validate one batch file without decoding it (see the module docstring); DataError
    names the file and the problem."""
    path = Path(path)
    try:
        if path.suffix == ".bin":
            _check_binary_size(path)
        else:
            _check_pickle_structure(path)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


# --------------------------------------------------------------------------- folders


def missing_batches(folder: Path) -> list[str]:
    """Names of the six batches absent from ``folder`` in both formats."""
    return [
        name
        for name in BATCH_NAMES
        if not (folder / name).is_file() and not (folder / f"{name}.bin").is_file()
    ]


def batches_folder(folder: Path) -> Path | None:
    """``folder`` if it holds any batch file, else its ``cifar-10-batches-py`` (or -bin)
    subfolder if that does, else None."""
    for candidate in (folder, folder / PY_FOLDER, folder / BIN_FOLDER):
        if len(missing_batches(candidate)) < len(BATCH_NAMES):
            return candidate
    return None


def batch_files(folder) -> dict[str, Path]:
    """Name -> file of the six batches in ``folder`` (or its cifar-10-batches-py/-bin
    subfolder). Pickles are preferred over .bin files; DataError if any batch is missing."""
    folder = Path(folder)
    folder = batches_folder(folder) or folder
    missing = missing_batches(folder)
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
