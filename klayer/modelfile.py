"""The model file: model.npz (parameters and moving averages by name, no pickle) and its
header model.json (architecture, standardizer, class names, versions, checksum).

:func:`save_model` writes both (model.npz first, each atomically); :func:`read_model`
reads them back into a :class:`klayer.nn.network.Network` after checking everything:
the header against the shapes stored in model.npz before any network is built, every
array's CRC, and a checksum that covers the arrays and every header field, so editing
class names, the standardizer or ``bn_eps`` is caught like editing a weight. A damaged
or edited file gives a ValueError that says what is wrong and what to do.
:func:`klayer.load_model` wraps :func:`read_model` for users.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from klayer.runs import HEADER_FILE, MODEL_FILE, atomic_write, read_npz, write_json
from klayer.version import __version__
from klayer.nn.network import Network, array_shapes
from klayer.nn.errors import UserError

FORMAT_VERSION = 2  # 2: the checksum covers the header too
MAX_MODEL_VALUES = 2**28  # a header declaring more parameters than this is refused


def save_model(run_dir, net: Network, standardizer=None, class_names=None,
               folded_whitening: dict | None = None) -> None:
    """model.npz (params and moving averages by name) and its header model.json.

    The header holds ``net.hyperparameters()``, the standardizer's ``to_dict()``, the
    class names, the versions and a checksum of model.npz and of the header itself
    (:func:`model_checksum`); model.npz is written first. ``folded_whitening``: for
    information only, the whitening the network was trained behind and that is folded
    into its first layer (the network takes standardised rows like any other).
    """
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    np.savez(buf, **net.params, **net.buffers)
    data = buf.getvalue()
    atomic_write(run_dir / MODEL_FILE, lambda f: f.write(data))
    header = {
        "format": "klayer-model",
        "format_version": FORMAT_VERSION,
        "klayer_version": __version__,
        "architecture": net.hyperparameters(),
        "running_initialised": net.running_initialised,
        "standardizer": None if standardizer is None else standardizer.to_dict(),
        "class_names": None if class_names is None else list(class_names),
    }
    if folded_whitening is not None:
        header["folded_whitening"] = folded_whitening
    header["checksum"] = model_checksum(data, header)
    write_json(run_dir / HEADER_FILE, header)


def model_checksum(npz_bytes: bytes, header: dict) -> str:
    """SHA-256 of everything that changes a prediction: the bytes of model.npz, then the
    canonical JSON (sorted keys) of the header without its ``checksum`` field."""
    fields = {k: v for k, v in header.items() if k != "checksum"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    h = hashlib.sha256(hashlib.sha256(npz_bytes).digest())
    h.update(canonical.encode("ascii"))
    return "sha256:" + h.hexdigest()


def read_model(path):
    """(Network, Standardizer or None, class names or None) from a run folder or model file.

    ``path``: a run folder, its model.npz or its model.json. Raises FileNotFoundError
    for a missing file and ValueError naming the problem for a truncated, edited or
    malformed one. The header is checked against the shapes stored in model.npz before
    any network is built, and the checksum covers both files.
    """
    path = Path(path)
    if path.is_dir():
        npz_path, header_path = path / MODEL_FILE, path / HEADER_FILE
    else:
        npz_path, header_path = path.with_suffix(".npz"), path.with_suffix(".json")
    for p in (npz_path, header_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: {path} holds no saved klayer model "
                                    "(train one with `klayer train`, or check the path)")
    header = _read_header(header_path)
    expected = _declared_arrays(header, header_path)
    data = npz_path.read_bytes()
    _check_stored_arrays(_npz_headers(data, npz_path), expected, npz_path)
    arrays = read_npz(data, npz_path)
    try:
        net = Network.from_hyperparameters(header["architecture"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{header_path}: invalid architecture ({exc}); the header is "
                        "damaged: restore it or retrain") from None
    buffers = {k: arrays.pop(k) for k in list(arrays) if k.startswith("running_")}
    restore_network(net, arrays, buffers, header["running_initialised"], npz_path)
    standardizer = _header_standardizer(header, net, header_path)
    if model_checksum(data, header) != header["checksum"]:
        raise UserError(f"{header_path} or {npz_path.name} does not match the checksum in "
                        f"{header_path.name}: a file was changed after it was saved "
                        "(weights, class names, standardizer or architecture); restore "
                        "it or retrain")
    return net, standardizer, header["class_names"]


def restore_network(net: Network, params: dict, buffers: dict, running_initialised: bool,
                    source) -> None:
    """Put saved arrays into ``net`` (a population's with their member axis) after
    checking names, shapes, dtypes and values."""
    expected = {k: v.shape for k, v in net.params.items()}
    lead = expected["W1"][:-2]  # (K,) for a population
    _, expected_buffers = array_shapes(net.sizes, net.norm is not None, net.batch_norm,
                                       running_initialised, lead)
    stored = {name: (a.shape, a.dtype) for name, a in {**params, **buffers}.items()}
    _check_stored_arrays(stored, {"parameters": (expected, net.dtype),
                                  "moving averages": (expected_buffers, net.dtype)}, source)
    for name, a in {**params, **buffers}.items():
        if not np.isfinite(a).all():
            raise UserError(f"{source}: {name} contains NaN or infinite values; the run "
                            "diverged or the file is damaged: retrain it")
    for name, a in buffers.items():
        if name.startswith("running_var") and (a < 0).any():
            raise UserError(f"{source}: {name} has negative variances; the file is damaged")
    net.params = {k: np.array(params[k]) for k in expected}
    net.buffers = {k: np.array(buffers[k]) for k in expected_buffers}
    net.running_initialised = bool(running_initialised)


def _check_stored_arrays(stored: dict, expected: dict, source) -> None:
    """stored: {name: (shape, dtype)}; expected: {what: ({name: shape}, dtype)}, "what"
    being "parameters" or "moving averages" (names starting with ``running_``)."""
    for what, (shapes, dtype) in expected.items():
        got = {k: v for k, v in stored.items()
               if k.startswith("running_") == (what == "moving averages")}
        missing, extra = sorted(set(shapes) - set(got)), sorted(set(got) - set(shapes))
        if missing or extra:
            raise UserError(
                f"{source}: {what} do not match the architecture in the header "
                f"(missing {missing or 'none'}, unexpected {extra or 'none'}); the file was "
                "written for another network or was edited: retrain or restore it")
        for name, shape in shapes.items():
            got_shape, got_dtype = got[name]
            if got_shape != shape:
                raise UserError(f"{source}: {name} has shape {got_shape} but the architecture "
                                f"in the header needs {shape}; retrain or restore the file")
            if got_dtype != dtype:
                raise UserError(f"{source}: {name} has dtype {got_dtype} but the header says "
                                f"{dtype}; retrain or restore the file")


def _declared_arrays(header: dict, path: Path) -> dict:
    """{"parameters": ({name: shape}, dtype), "moving averages": (...)} that the header's
    architecture declares, computed without building the network; absurd sizes refused."""
    arch = header["architecture"]

    def sizes(value, name):
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise UserError(f"{path}: invalid architecture ({name} must be positive integers, "
                            f"got {value!r}); the header is damaged: restore it or retrain")
        return values

    try:
        widths = [*sizes(arch["input_size"], "input_size"),
                  *sizes(arch["hidden_sizes"], "hidden_sizes"),
                  *sizes(arch["num_classes"], "num_classes")]
        dtype = np.dtype(arch["dtype"])
        norm = bool(arch.get("batch_norm")) or bool(arch.get("layer_norm"))
        batch_norm = bool(arch.get("batch_norm"))
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: invalid architecture ({exc!r}); the header is damaged: "
                        "restore it or retrain") from None
    params, buffers = array_shapes(widths, norm, batch_norm, header["running_initialised"])
    values = sum(int(np.prod(s)) for s in (*params.values(), *buffers.values()))
    if values > MAX_MODEL_VALUES:
        raise UserError(f"{path}: the architecture declares {values} parameters, more than "
                        f"klayer loads ({MAX_MODEL_VALUES}); the header is damaged: restore "
                        "it or retrain")
    return {"parameters": (params, dtype), "moving averages": (buffers, dtype)}


def _npz_headers(data: bytes, path: Path) -> dict:
    """{name: (shape, dtype)} of the arrays in an npz file, read from the .npy headers
    without loading any array."""
    try:
        out = {}
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise UserError(f"unsupported .npy version {version}")
                if dtype.hasobject:
                    raise UserError(f"{info.filename} holds Python objects")
                out[info.filename.removesuffix(".npy")] = (shape, dtype)
        return out
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path} is truncated or not a NumPy .npz file ({exc}); "
                        "restore it or retrain") from None


def _read_header(path: Path) -> dict:
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the header is damaged: "
                        "restore it or retrain") from None
    if not isinstance(header, dict) or header.get("format") != "klayer-model":
        raise UserError(f"{path} is not a klayer model header")
    version = header.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise UserError(f"{path} has model format {version!r}, written by an older klayer, "
                        f"whose checksum does not cover the header; this klayer "
                        f"({__version__}) reads format {FORMAT_VERSION}: retrain the model "
                        "or re-save it (klayer.modelfile.save_model) with this klayer")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has model format {version!r}; this klayer "
                        f"({__version__}) reads format {FORMAT_VERSION}: use a matching klayer")
    required = ("architecture", "running_initialised", "standardizer", "class_names",
                "checksum")
    missing = [k for k in required if k not in header]
    if missing:
        raise UserError(f"{path} lacks {missing}; the header is damaged: restore it or retrain")
    if not isinstance(header["architecture"], dict):
        raise UserError(f"{path}: architecture must be a JSON object")
    names = header["class_names"]
    if names is not None and (not isinstance(names, list) or
                              len(names) != header["architecture"].get("num_classes")):
        raise UserError(f"{path}: class_names must list one name per class")
    return header


def _header_standardizer(header: dict, net: Network, path: Path):
    if header["standardizer"] is None:
        return None
    from klayer.data import Standardizer

    try:
        std = Standardizer.from_dict(header["standardizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: invalid standardizer ({exc}); restore the header or retrain") \
            from None
    if std.mean.shape != (net.input_size,):
        raise UserError(f"{path}: the standardizer has {std.mean.shape[0]} dimensions but the "
                        f"network takes {net.input_size}; restore the header or retrain")
    return std
