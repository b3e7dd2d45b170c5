"""Run folders: the files a training run leaves, and reading them back safely.

One folder per run::

    config.toml      the resolved TrainConfig
    checkpoint.npz   the state after the last finished epoch (written atomically)
    history.csv      one row per evaluation point
    model.npz        parameters and batch-norm moving averages (no pickle)
    model.json       its header: architecture, standardizer, class names, versions, checksum
    summary.json     final train/val/test metrics, best validation accuracy, timings
    curves.png       loss, cost and accuracy, train against validation (klayer.plots)

Every file is written to a temporary name and moved into place with ``os.replace``, so
a run killed at any moment leaves either the old file or the new one, never half of
one. Arrays are read with ``allow_pickle=False`` and checked against the header:
a damaged or edited file gives a ValueError that says what is wrong and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klayer import __version__
from klayer.config import TrainConfig
from klayer.network import Network

FORMAT_VERSION = 1
CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.npz"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.npz"
HEADER_FILE = "model.json"
SUMMARY_FILE = "summary.json"

HISTORY_FIELDS = ("step", "epoch", "eta", "train_loss", "train_cost", "train_accuracy",
                  "val_loss", "val_cost", "val_accuracy")


# --- writing files atomically -----------------------------------------------------------


def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then move it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_npz(path, arrays: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


# --- configuration, history, summary ------------------------------------------------------


def write_config(run_dir, config: TrainConfig) -> None:
    write_text(Path(run_dir) / CONFIG_FILE, config.to_toml())


def read_config(run_dir) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a klayer run folder: {CONFIG_FILE} is missing")
    return TrainConfig.from_toml(path)


def write_history(path, history: list[dict]) -> None:
    """history: one dict per evaluation point with the keys of HISTORY_FIELDS."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k]
                         for k in HISTORY_FIELDS})
    write_text(path, buf.getvalue())


def read_history(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != set(HISTORY_FIELDS):
        raise ValueError(f"{path}: columns {sorted(rows[0])} are not klayer history columns "
                         f"{list(HISTORY_FIELDS)}")
    return [{k: int(r[k]) if k == "step" else float(r[k]) for k in HISTORY_FIELDS}
            for r in rows]


def write_summary(run_dir, summary: dict) -> None:
    write_json(Path(run_dir) / SUMMARY_FILE, summary)


def read_summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))


# --- checkpoints ---------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped.

    ``step`` updates done, after ``epoch`` whole epochs; the network's ``params``,
    ``buffers`` and ``running_initialised``; the optimizer's ``state_dict()``; the
    shuffling generator's ``bit_generator.state``; the history so far; the seconds
    spent so far (``timings``); and the hash of the config it belongs to.
    """

    step: int
    epoch: int
    params: dict
    buffers: dict
    running_initialised: bool
    optimizer_state: dict
    rng_state: dict
    history: list
    timings: dict
    config_hash: str
    rng_states: dict = field(default_factory=dict)  # augmentation and dropout generators


def save_checkpoint(run_dir, ckpt: Checkpoint) -> None:
    """Write checkpoint.npz atomically: arrays under param./buffer./optim., the rest as JSON."""
    arrays = {f"param.{k}": v for k, v in ckpt.params.items()}
    arrays.update({f"buffer.{k}": v for k, v in ckpt.buffers.items()})
    arrays.update({f"optim.{k}": np.asarray(v) for k, v in ckpt.optimizer_state.items()})
    meta = {
        "format_version": FORMAT_VERSION, "klayer_version": __version__,
        "step": ckpt.step, "epoch": ckpt.epoch,
        "running_initialised": ckpt.running_initialised, "rng_state": ckpt.rng_state,
        "rng_states": ckpt.rng_states,
        "history": ckpt.history, "timings": ckpt.timings, "config_hash": ckpt.config_hash,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    write_npz(Path(run_dir) / CHECKPOINT_FILE, arrays)


def load_checkpoint(run_dir) -> Checkpoint:
    """Read checkpoint.npz (arrays are checked against the network when restored)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir}: {CHECKPOINT_FILE} is "
                                "missing (the run never finished its first step)")
    arrays = _read_npz(path.read_bytes(), path)
    try:
        meta = json.loads(str(arrays.pop("meta")))
        groups = {"param": {}, "buffer": {}, "optim": {}}
        for key, value in arrays.items():
            group, _, name = key.partition(".")
            groups[group][name] = value
        return Checkpoint(
            step=int(meta["step"]), epoch=int(meta["epoch"]), params=groups["param"],
            buffers=groups["buffer"], running_initialised=bool(meta["running_initialised"]),
            optimizer_state={k: v[()] if v.ndim == 0 else v for k, v in groups["optim"].items()},
            rng_state=meta["rng_state"], history=meta["history"], timings=meta["timings"],
            config_hash=meta["config_hash"], rng_states=meta.get("rng_states", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a klayer checkpoint ({exc}); "
                         "start the run again without --resume") from None


# --- models --------------------------------------------------------------------------------


def save_model(run_dir, net: Network, standardizer=None, class_names=None) -> None:
    """model.npz (params and moving averages by name) and its header model.json.

    The header holds ``net.hyperparameters()``, the standardizer's ``to_dict()``, the
    class names, the versions and the SHA-256 of model.npz, written after it.
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
        "model_sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json(run_dir / HEADER_FILE, header)


def load_model(path):
    """(Network, Standardizer or None, class names or None) from a run folder or model file.

    ``path``: a run folder, its model.npz or its model.json. Raises FileNotFoundError
    for a missing file and ValueError naming the problem for a truncated, edited or
    malformed one.
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
    data = npz_path.read_bytes()
    arrays = _read_npz(data, npz_path)
    try:
        net = Network.from_hyperparameters(header["architecture"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{header_path}: invalid architecture ({exc}); the header is "
                         "damaged: restore it or retrain") from None
    buffers = {k: arrays.pop(k) for k in list(arrays) if k.startswith("running_")}
    restore_network(net, arrays, buffers, header["running_initialised"], npz_path)
    if hashlib.sha256(data).hexdigest() != header["model_sha256"]:
        raise ValueError(f"{npz_path} does not match the checksum in {header_path.name}: the "
                         "file was changed after it was saved; restore it or retrain")
    return net, _header_standardizer(header, net, header_path), header["class_names"]


def restore_network(net: Network, params: dict, buffers: dict, running_initialised: bool,
                    source) -> None:
    """Put saved arrays into ``net`` after checking names, shapes, dtypes and values."""
    expected = {k: v.shape for k, v in net.params.items()}
    expected_buffers = {}
    if net.batch_norm and running_initialised:
        for l in range(1, net.num_layers):
            m = net.sizes[l]
            expected_buffers[f"running_mean{l}"] = expected_buffers[f"running_var{l}"] = (m,)
    for got, want, what in ((params, expected, "parameters"),
                            (buffers, expected_buffers, "moving averages")):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise ValueError(
                f"{source}: {what} do not match the architecture in the header "
                f"(missing {missing or 'none'}, unexpected {extra or 'none'}); the file was "
                "written for another network or was edited: retrain or restore it")
        for name, shape in want.items():
            a = got[name]
            if a.shape != shape:
                raise ValueError(f"{source}: {name} has shape {a.shape} but the architecture "
                                 f"in the header needs {shape}; retrain or restore the file")
            if a.dtype != net.dtype:
                raise ValueError(f"{source}: {name} has dtype {a.dtype} but the header says "
                                 f"{net.dtype}; retrain or restore the file")
            if not np.isfinite(a).all():
                raise ValueError(f"{source}: {name} contains NaN or infinite values; the run "
                                 "diverged or the file is damaged: retrain it")
    for name, a in buffers.items():
        if name.startswith("running_var") and (a < 0).any():
            raise ValueError(f"{source}: {name} has negative variances; the file is damaged")
    net.params = {k: np.array(params[k]) for k in expected}
    net.buffers = {k: np.array(buffers[k]) for k in expected_buffers}
    net.running_initialised = bool(running_initialised)


def _read_header(path: Path) -> dict:
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the header is damaged: "
                         "restore it or retrain") from None
    required = ("format", "format_version", "architecture", "running_initialised",
                "standardizer", "class_names", "model_sha256")
    if not isinstance(header, dict) or header.get("format") != "klayer-model":
        raise ValueError(f"{path} is not a klayer model header")
    missing = [k for k in required if k not in header]
    if missing:
        raise ValueError(f"{path} lacks {missing}; the header is damaged: restore it or retrain")
    if header["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has model format {header['format_version']!r}; this klayer "
                         f"({__version__}) reads format {FORMAT_VERSION}: use a matching klayer")
    if not isinstance(header["architecture"], dict):
        raise ValueError(f"{path}: architecture must be a JSON object")
    names = header["class_names"]
    if names is not None and (not isinstance(names, list) or
                              len(names) != header["architecture"].get("num_classes")):
        raise ValueError(f"{path}: class_names must list one name per class")
    return header


def _header_standardizer(header: dict, net: Network, path: Path):
    if header["standardizer"] is None:
        return None
    from klayer.data import Standardizer

    try:
        std = Standardizer.from_dict(header["standardizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid standardizer ({exc}); restore the header or retrain") \
            from None
    if std.mean.shape != (net.input_size,):
        raise ValueError(f"{path}: the standardizer has {std.mean.shape[0]} dimensions but the "
                         f"network takes {net.input_size}; restore the header or retrain")
    return std


def _read_npz(data: bytes, path: Path) -> dict:
    """All arrays of an npz file held in ``data``, loaded without pickle."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is truncated or not a NumPy .npz file ({exc}); "
                         "restore it or retrain") from None
