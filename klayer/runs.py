"""Run folders: the files a training run leaves, and reading them back safely.

One folder per run::

    config.toml          the resolved TrainConfig
    checkpoint.npz       the state after the last finished epoch
    checkpoint.prev.npz  the one before (a damaged newest falls back to it)
    history.csv          one row per evaluation point
    model.npz            parameters and batch-norm moving averages (no pickle)
    model.json           its header: architecture, standardizer, class names, versions, checksum
    summary.json         final train/val/test metrics, best validation accuracy, timings
    whitening.npz        with ``whiten``: the whitening fitted at the start (reused on resume)
    curves.png           loss, cost and accuracy, train against validation (klayer.plots)
    .lock                held (flock) by the process writing the folder: its PID and command

Every file is written to a temporary name and moved into place with ``os.replace``, so
a run killed at any moment leaves either the old file or the new one, never half of
one; temporary files left by a killed run are never read, and are removed when the
folder is next opened. Arrays are read with ``allow_pickle=False`` and checked against
the header: a damaged or edited file gives a ValueError that says what is wrong and what
to do. The checksum in model.json covers the arrays and every header field, so editing
class names, the standardizer or ``bn_eps`` is caught like editing a weight.

Test-only fault injection: with the environment variable ``KLAYER_FAULT=checkpoint:STEP``
the process kills itself (SIGKILL) half-way through writing the checkpoint of step STEP,
before the temporary file is moved into place; with ``KLAYER_FAULT=step:STEP`` it kills
itself right after update step STEP; ``step:STEP@K`` waits for the K-th time this process
reaches step STEP (the K-th trial of a search run in one process). The tests use it to
check what survives a crash, deterministically.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import signal
import warnings
import zipfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klayer.nn.errors import UserError
from klayer.version import __version__
from klayer.config import TrainConfig
from klayer.nn.network import Network

FORMAT_VERSION = 2  # model files; 2: the checksum covers the header too
CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.npz"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.npz"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.npz"
HEADER_FILE = "model.json"
SUMMARY_FILE = "summary.json"
WHITENING_FILE = "whitening.npz"
LOCK_FILE = ".lock"
# what a run leaves besides config.toml (removed when a run is started again)
RUN_FILES = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, HISTORY_FILE, MODEL_FILE,
             HEADER_FILE, SUMMARY_FILE, "curves.png", "confusion.png", WHITENING_FILE)
MAX_MODEL_VALUES = 2**28  # a header declaring more parameters than this is refused

HISTORY_FIELDS = ("step", "epoch", "eta", "train_loss", "train_cost", "train_accuracy",
                  "val_loss", "val_cost", "val_accuracy")


class CheckpointWarning(UserWarning):
    """The newest checkpoint was damaged; the run resumes from the previous one."""


class FolderInUseError(OSError):
    """Another live process holds the folder's lock."""

    def __str__(self):
        return self.args[0]


# --- writing files atomically -----------------------------------------------------------


def atomic_write(path, write, previous=None) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then move it into place.

    previous: if given, the file at ``path`` (if any) is first moved there, so that the
    last two versions are kept.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_npz(path, arrays: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


# --- locks ---------------------------------------------------------------------------------


@contextmanager
def folder_lock(path, what: str, kind: str = "run folder"):
    """Hold the lock of folder ``path`` (created if needed) while klayer writes into it.

    An exclusive, non-blocking ``flock`` on ``<path>/.lock``, which records the holder's
    PID and ``what`` it is (e.g. "klayer train"). A second writer gets a
    :class:`FolderInUseError` naming that process. The OS releases the lock when its
    holder exits, however it exits (even SIGKILL), so a lock left by a dead process is
    simply taken over.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(f"{kind} {path} is in use by {_lock_holder(lock_path)}; "
                                   "wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(lock_path: Path) -> str:
    pid, _, what = lock_path.read_text(encoding="utf-8", errors="replace").strip().partition(" ")
    return f"process {pid} ({what})" if pid.isdigit() else "another process"


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
        raise UserError(f"{path}: columns {sorted(rows[0])} are not klayer history columns "
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
    rng_states: dict = field(default_factory=dict)  # augmentation, dropout, mixing generators
    ema_state: dict = field(default_factory=dict)  # klayer.levers.ema.EMA.state_dict(), with ``ema``
    source: Path | None = None  # the file it was read from


def save_checkpoint(run_dir, ckpt: Checkpoint) -> None:
    """Write checkpoint.npz atomically, keeping the one before as checkpoint.prev.npz.

    Arrays go under param./buffer./optim., the rest into a JSON ``meta`` entry.
    """
    arrays = {f"param.{k}": v for k, v in ckpt.params.items()}
    arrays.update({f"buffer.{k}": v for k, v in ckpt.buffers.items()})
    arrays.update({f"optim.{k}": np.asarray(v) for k, v in ckpt.optimizer_state.items()})
    arrays.update({f"ema.{k}": v for k, v in ckpt.ema_state.items() if k != "step"})
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION, "klayer_version": __version__,
        "step": ckpt.step, "epoch": ckpt.epoch,
        "running_initialised": ckpt.running_initialised, "rng_state": ckpt.rng_state,
        "rng_states": ckpt.rng_states,
        "history": ckpt.history, "timings": ckpt.timings, "config_hash": ckpt.config_hash,
    }
    if ckpt.ema_state:
        meta["ema_step"] = int(ckpt.ema_state["step"])
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()

    def write(f):
        if _fault("checkpoint") == ckpt.step:  # test-only: die half-way through
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)

    run_dir = Path(run_dir)
    atomic_write(run_dir / CHECKPOINT_FILE, write, previous=run_dir / PREVIOUS_CHECKPOINT_FILE)


def load_checkpoint(run_dir) -> Checkpoint:
    """The newest readable checkpoint of ``run_dir``: checkpoint.npz, or, when it is
    missing or damaged, checkpoint.prev.npz (with a :class:`CheckpointWarning`).

    Arrays are checked against the network when restored (:func:`restore_network`).
    """
    run_dir = Path(run_dir)
    problems = []
    for path in (run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE):
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        try:
            ckpt = _read_checkpoint(path)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {path} "
                          f"(step {ckpt.step})", CheckpointWarning, stacklevel=2)
        return ckpt
    if all(p.endswith("is missing") for p in problems):
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir}: {CHECKPOINT_FILE} is "
                                "missing (the run never finished its first step)")
    raise UserError(f"no usable checkpoint in {run_dir} ({'; '.join(problems)}); start the "
                    f"run again with `klayer train --restart --config "
                    f"{run_dir / CONFIG_FILE} --out {run_dir}`")


def _read_checkpoint(path: Path) -> Checkpoint:
    arrays = _read_npz(path.read_bytes(), path, advice=None)
    try:
        meta = json.loads(str(arrays.pop("meta")))
        groups = {"param": {}, "buffer": {}, "optim": {}, "ema": {}}
        for key, value in arrays.items():
            group, _, name = key.partition(".")
            groups[group][name] = value
        return Checkpoint(
            step=int(meta["step"]), epoch=int(meta["epoch"]), params=groups["param"],
            buffers=groups["buffer"], running_initialised=bool(meta["running_initialised"]),
            optimizer_state={k: v[()] if v.ndim == 0 else v for k, v in groups["optim"].items()},
            rng_state=meta["rng_state"], history=meta["history"], timings=meta["timings"],
            config_hash=meta["config_hash"], rng_states=meta.get("rng_states", {}),
            ema_state=({"step": int(meta["ema_step"]), **groups["ema"]}
                       if "ema_step" in meta else {}),
            source=path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is not a klayer checkpoint ({exc})") from None


def _fault(where: str) -> int | None:
    """Test-only: the step of ``KLAYER_FAULT=where:STEP[@K]`` (see the module docstring)."""
    kind, _, step = os.environ.get("KLAYER_FAULT", "").partition(":")
    step = step.partition("@")[0]
    return int(step) if kind == where and step.isdigit() else None


_FAULT_STEPS_SEEN = [0]  # how often this process has reached the KLAYER_FAULT step


def fault_callbacks() -> list:
    """Test-only: with ``KLAYER_FAULT=step:STEP[@K]``, a training callback that kills the
    process right after update step STEP (the K-th time it gets there); otherwise none."""
    step = _fault("step")
    if step is None:
        return []
    times = os.environ["KLAYER_FAULT"].partition("@")[2]
    times = int(times) if times.isdigit() else 1

    def kill(event):
        if event.kind == "step" and event.step == step:
            _FAULT_STEPS_SEEN[0] += 1
            if _FAULT_STEPS_SEEN[0] >= times:
                os.kill(os.getpid(), signal.SIGKILL)

    return [kill]


# --- the folder of a training run ----------------------------------------------------------


class RunFolder:
    """The folder a training run writes into, locked while the run lasts.

    ``with RunFolder(path, config, resume=..., restart=...) as folder:`` locks the folder
    (:func:`folder_lock`) and opens it: a new run writes config.toml; ``resume`` checks
    that the saved config is ``config``; ``restart`` clears a run already there. Then
    :meth:`checkpoint` after every epoch, :meth:`last_checkpoint` to resume and
    :meth:`finish` at the end. With ``path`` None nothing is written.
    """

    def __init__(self, path, config: TrainConfig, resume: bool = False,
                 restart: bool = False):
        if resume and restart:
            raise UserError("resume a run or restart it, not both")
        if resume and path is None:
            raise UserError("resume needs the run folder to continue (run_dir)")
        self.path = None if path is None else Path(path)
        self.config, self.resume, self.restart = config, resume, restart
        self.last_step = None  # step of the last checkpoint written or read
        self.finished = False  # resuming a run that left its model and summary: no writes
        self._lock = ExitStack()

    def __enter__(self) -> "RunFolder":
        if self.path is None:
            return self
        if self.resume:
            read_config(self.path)  # before creating anything: is it a run folder?
        self._lock.enter_context(folder_lock(self.path, "klayer train"))
        try:
            self._open()
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.close()

    def _open(self) -> None:
        for tmp in self.path.glob(".*.tmp"):  # left by a killed writer; never trusted
            tmp.unlink()
        if self.resume:
            if read_config(self.path).config_hash() != self.config.config_hash():
                raise UserError(f"{self.path} was started with another configuration "
                                f"(see its {CONFIG_FILE}); resume it with that one")
            self.finished = all((self.path / name).exists()
                                for name in (MODEL_FILE, HEADER_FILE, SUMMARY_FILE))
            return
        if any((self.path / name).exists() for name in RUN_FILES[:5]):
            if not self.restart:
                raise UserError(
                    f"{self.path} already holds a run: resume it (klayer train --resume "
                    f"{self.path}), start it again (add --restart) or choose another "
                    "output folder")
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        write_config(self.path, self.config.replace(out=str(self.path)))

    def last_checkpoint(self) -> Checkpoint:
        """The checkpoint to resume from (see :func:`load_checkpoint`)."""
        ckpt = load_checkpoint(self.path)
        if ckpt.config_hash != self.config.config_hash():
            raise UserError(f"the checkpoint in {self.path} belongs to another configuration "
                            f"than its {CONFIG_FILE}; start a new run instead")
        if ckpt.source.name == PREVIOUS_CHECKPOINT_FILE:  # the newest is damaged: drop it,
            (self.path / CHECKPOINT_FILE).unlink(missing_ok=True)  # or it would replace this
        self.last_step = ckpt.step
        self.finished = self.finished and ckpt.step == self.config.total_steps
        return ckpt

    def checkpoint(self, ckpt: Checkpoint) -> None:
        """Save the checkpoint and the history so far."""
        if self.path is None:
            return
        save_checkpoint(self.path, ckpt)
        write_history(self.path / HISTORY_FILE, ckpt.history)
        self.last_step = ckpt.step

    def finish(self, result, data) -> None:
        """The model, history, summary and curves of a finished ``TrainResult`` (kept as
        they are when the run had finished before)."""
        if self.path is None or self.finished:
            return
        from klayer import plots

        c = result.config
        folded = None if c.whiten == "none" else {
            "method": c.whiten, "eps": c.whiten_eps, "components": c.whiten_components}
        save_model(self.path, result.network, getattr(data, "standardizer", None),
                   getattr(data, "class_names", None), folded_whitening=folded)
        write_history(self.path / HISTORY_FILE, result.history)
        write_summary(self.path, result.summary())
        plots.plot_history(result.history, self.path, title=self.path.name)

    def whitening(self, fit):
        """The run's whitening: the one stored in whitening.npz when resuming, else
        ``fit()``, stored there (a resumed run then uses the very same arrays)."""
        from klayer.levers.whiten import Whitening

        path = None if self.path is None else self.path / WHITENING_FILE
        if self.resume and path.exists():
            arrays = _read_npz(path.read_bytes(), path, advice="delete it to fit it again")
            try:
                meta = json.loads(str(arrays.pop("meta")))
                whitening = Whitening.from_arrays(arrays, meta)
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{path} is not a klayer whitening ({exc}); delete it to "
                                "fit it again") from None
            c = self.config
            if (whitening.method, whitening.eps, whitening.components) != \
                    (c.whiten, c.whiten_eps, c.whiten_components):
                raise UserError(f"{path} holds another whitening than {CONFIG_FILE} asks "
                                "for; delete it to fit it again")
            return whitening
        whitening = fit()
        if path is not None:
            arrays, meta = whitening.to_arrays()
            write_npz(path, {**arrays, "meta": np.array(json.dumps(meta))})
        return whitening

    def where_to_resume(self) -> str:
        """For error messages: where the last good checkpoint is ("" without a folder)."""
        if self.path is None or self.last_step is None:
            return ""
        return (f"; the last good checkpoint (step {self.last_step}) stays in "
                f"{self.path / CHECKPOINT_FILE}")


# --- models --------------------------------------------------------------------------------


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


def load_model(path):
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
    arrays = _read_npz(data, npz_path)
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
    """Put saved arrays into ``net`` after checking names, shapes, dtypes and values."""
    expected = {k: v.shape for k, v in net.params.items()}
    expected_buffers = {}
    if net.batch_norm and running_initialised:
        for l in range(1, net.num_layers):
            m = net.sizes[l]
            expected_buffers[f"running_mean{l}"] = expected_buffers[f"running_var{l}"] = (m,)
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
    k = len(widths) - 1
    params, buffers = {}, {}
    for l in range(1, k + 1):
        m = widths[l]
        params[f"W{l}"], params[f"b{l}"] = (m, widths[l - 1]), (m,)
        if norm and l < k:
            params[f"gamma{l}"] = params[f"beta{l}"] = (m,)
        if batch_norm and l < k and header["running_initialised"]:
            buffers[f"running_mean{l}"] = buffers[f"running_var{l}"] = (m,)
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
                        "or re-save it (runs.save_model) with this klayer")
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


def _read_npz(data: bytes, path: Path, advice: str | None = "restore it or retrain") -> dict:
    """All arrays of an npz file held in ``data``, loaded without pickle after checking
    every member's CRC (a damaged byte anywhere is caught, not only a truncation)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
        if bad is not None:
            raise UserError(f"{bad} fails its CRC check")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path} is truncated or not a NumPy .npz file ({exc})"
                        + (f"; {advice}" if advice else "")) from None
