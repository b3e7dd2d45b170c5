"""Run folders: the files a training run leaves, and reading them back safely.

One folder per run::

    config.toml          the resolved TrainConfig
    checkpoint.npz       the state after the last finished epoch
    checkpoint.prev.npz  the one before (a damaged newest falls back to it)
    history.csv          one row per evaluation point
    model.npz            parameters and batch-norm moving averages (:mod:`klayer.modelfile`)
    model.json           its header: architecture, standardizer, class names, versions, checksum
    summary.json         final train/val/test metrics, best validation accuracy, timings
    whitening.npz        with ``whiten``: the whitening fitted at the start (reused on resume)
    curves.png           loss, cost and accuracy, train against validation (klayer.plots)
    .lock                held (flock) by the process writing the folder: its PID and command

The checkpoint is copied at the end of an epoch and written by a thread while the next
epoch's first steps run (:meth:`RunFolder.checkpoint`). Every file is written to a
temporary name and moved into place with ``os.replace``, so a run killed at any moment
leaves either the old file or the new one, never half of one; temporary files left by a
killed run are never read, and are removed when the folder is next opened. Arrays are
read with ``allow_pickle=False`` after checking every member's CRC: a damaged file gives
a ValueError that says what is wrong and what to do.
The model files are :mod:`klayer.modelfile`'s.

A population (:func:`klayer.train.train_population`) keeps one checkpoint for all its
members in a folder of its own; each member's results go to its own run folder at the
end, written like a run's alone (:func:`klayer.train.write_run`).

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
import io
import json
import os
import signal
import threading
import warnings
import zipfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klayer.version import __version__
from klayer.config import TrainConfig
from klayer.nn.errors import UserError

CHECKPOINT_FORMAT_VERSION = 2  # 2: one history per member (a population's)
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
    """Everything needed to continue a run (or a population) exactly where it stopped.

    ``step`` updates done, after ``epoch`` whole epochs; the network's ``params``,
    ``buffers`` and ``running_initialised`` (a population's carry the member axis); the
    optimizer's ``state_dict()``; the shuffling generator's ``bit_generator.state`` and
    the others' (``rng_states``: "augment", "mix", and "dropout", one per member); each
    member's history so far and, once dropped, why (``dropped``); the seconds spent so
    far (``timings``); and the hash of the configs it belongs to (:func:`configs_hash`).
    """

    step: int
    epoch: int
    params: dict
    buffers: dict
    running_initialised: bool
    optimizer_state: dict
    rng_state: dict
    histories: list
    timings: dict
    config_hash: str
    rng_states: dict = field(default_factory=dict)
    ema_state: dict = field(default_factory=dict)  # klayer.levers.ema.EMA.state_dict(), with ``ema``
    dropped: list = field(default_factory=list)  # per member: None or {"step", "eta", "reason"}
    source: Path | None = None  # the file it was read from


def configs_hash(configs) -> str:
    """The hash a checkpoint of ``configs`` (one run's, or a population's) carries."""
    return "+".join(c.config_hash() for c in configs)


def save_checkpoint(run_dir, ckpt: Checkpoint) -> None:
    """Write checkpoint.npz atomically, keeping the one before as checkpoint.prev.npz.

    Arrays go under param./buffer./optim./ema., the rest into a JSON ``meta`` entry.
    """
    write_checkpoint(run_dir, checkpoint_arrays(ckpt), ckpt.step)


def checkpoint_arrays(ckpt: Checkpoint, copy: bool = False) -> dict:
    """The arrays of checkpoint.npz, with its ``meta`` entry; ``copy``: copies of the
    arrays (a snapshot that stays as it is while training goes on)."""
    arrays = {f"param.{k}": v for k, v in ckpt.params.items()}
    arrays.update({f"buffer.{k}": v for k, v in ckpt.buffers.items()})
    arrays.update({f"optim.{k}": np.asarray(v) for k, v in ckpt.optimizer_state.items()})
    arrays.update({f"ema.{k}": v for k, v in ckpt.ema_state.items() if k != "step"})
    if copy:
        arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION, "klayer_version": __version__,
        "step": ckpt.step, "epoch": ckpt.epoch,
        "running_initialised": ckpt.running_initialised, "rng_state": ckpt.rng_state,
        "rng_states": ckpt.rng_states, "histories": ckpt.histories,
        "dropped": ckpt.dropped or [None] * len(ckpt.histories),
        "timings": ckpt.timings, "config_hash": ckpt.config_hash,
    }
    if ckpt.ema_state:
        meta["ema_step"] = int(ckpt.ema_state["step"])
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def write_checkpoint(run_dir, arrays: dict, step: int) -> None:
    """Write :func:`checkpoint_arrays` of the checkpoint of ``step`` as checkpoint.npz,
    atomically (the one before becomes checkpoint.prev.npz)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getbuffer()

    def write(f):
        if _fault("checkpoint") == step:  # test-only: die half-way through
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

    Arrays are checked against the network when restored
    (:func:`klayer.modelfile.restore_network`).
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
    arrays = read_npz(path.read_bytes(), path, advice=None)
    try:
        meta = json.loads(str(arrays.pop("meta")))
        groups = {"param": {}, "buffer": {}, "optim": {}, "ema": {}}
        for key, value in arrays.items():
            group, _, name = key.partition(".")
            groups[group][name] = value
        rng_states = meta.get("rng_states", {})
        if "history" in meta:  # format 1: one run's
            meta["histories"], meta["dropped"] = [meta["history"]], [None]
            if "dropout" in rng_states:
                rng_states["dropout"] = [rng_states["dropout"]]
        return Checkpoint(
            step=int(meta["step"]), epoch=int(meta["epoch"]), params=groups["param"],
            buffers=groups["buffer"], running_initialised=bool(meta["running_initialised"]),
            optimizer_state={k: v[()] if v.ndim == 0 else v for k, v in groups["optim"].items()},
            rng_state=meta["rng_state"], histories=meta["histories"], timings=meta["timings"],
            config_hash=meta["config_hash"], rng_states=rng_states, dropped=meta["dropped"],
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
_WRITERS = set()  # the threads writing a checkpoint (RunFolder.checkpoint)


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
                for writer in list(_WRITERS):  # the crash comes after the last checkpoint
                    writer.join()               # is on disk, whatever the disk's speed
                os.kill(os.getpid(), signal.SIGKILL)

    return [kill]


# --- the folder of a training run ----------------------------------------------------------


class RunFolder:
    """The folder a training run writes into, locked while the run lasts.

    ``with RunFolder(path, configs, resume=..., restart=...) as folder:`` locks the folder
    (:func:`folder_lock`) and opens it: a new run writes config.toml; ``resume`` checks
    that the saved config is the run's; ``restart`` clears a run already there. Then
    :meth:`checkpoint` after every epoch and :meth:`last_checkpoint` to resume. With
    ``path`` None nothing is written. ``configs``: the run's config, or a population's
    (its checkpoint folder holds no config.toml and no history.csv: those go to each
    member's run folder at the end).
    """

    def __init__(self, path, configs, resume: bool = False, restart: bool = False):
        if resume and restart:
            raise UserError("resume a run or restart it, not both")
        if resume and path is None:
            raise UserError("resume needs the folder to continue (run_dir or checkpoint_dir)")
        self.path = None if path is None else Path(path)
        self.configs = [configs] if isinstance(configs, TrainConfig) else list(configs)
        self.config = self.configs[0] if len(self.configs) == 1 else None
        self.resume, self.restart = resume, restart
        self.last_step = None  # step of the last checkpoint written or read
        self.finished = False  # resuming a run that left its model and summary: no writes
        self._lock = ExitStack()
        self._writer = None  # the thread writing the last checkpoint, until it is on disk
        self._write_error = None

    def __enter__(self) -> "RunFolder":
        if self.path is None:
            return self
        if self.resume and self.config is not None:
            read_config(self.path)  # before creating anything: is it a run folder?
        self._lock.enter_context(folder_lock(self.path, "klayer train"))
        try:
            self._open()
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:  # else the error that stopped the run is the one to see
                raise
        finally:
            self._lock.close()

    def _open(self) -> None:
        for tmp in self.path.glob(".*.tmp"):  # left by a killed writer; never trusted
            tmp.unlink()
        if self.resume:
            if self.config is not None and \
                    read_config(self.path).config_hash() != self.config.config_hash():
                raise UserError(f"{self.path} was started with another configuration "
                                f"(see its {CONFIG_FILE}); resume it with that one")
            self.finished = all((self.path / name).exists()
                                for name in (MODEL_FILE, HEADER_FILE, SUMMARY_FILE))
            return
        if any((self.path / name).exists() for name in RUN_FILES[:5]):
            if not self.restart:
                what = "a run: resume it (klayer train --resume " f"{self.path})" \
                    if self.config is not None else "a checkpoint: resume it (resume=True)"
                raise UserError(f"{self.path} already holds {what}, start it again (add "
                                "--restart) or choose another output folder")
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        if self.config is not None:
            write_config(self.path, self.config.replace(out=str(self.path)))

    def last_checkpoint(self) -> Checkpoint:
        """The checkpoint to resume from (see :func:`load_checkpoint`)."""
        ckpt = load_checkpoint(self.path)
        if ckpt.config_hash != configs_hash(self.configs):
            raise UserError(f"the checkpoint in {self.path} belongs to other configs than "
                            "this run's; start a new run instead")
        if ckpt.source.name == PREVIOUS_CHECKPOINT_FILE:  # the newest is damaged: drop it,
            (self.path / CHECKPOINT_FILE).unlink(missing_ok=True)  # or it would replace this
        self.last_step = ckpt.step
        self.finished = self.finished and ckpt.step == self.configs[0].total_steps
        return ckpt

    def checkpoint(self, ckpt: Checkpoint) -> None:
        """Save the checkpoint (and a run's history so far) while training goes on.

        The arrays are copied now; a thread writes them to disk (and syncs them) during
        the next steps. At most one checkpoint is in flight: the next one, and leaving
        the folder, wait for it, and raise what went wrong writing it.
        """
        if self.path is None:
            return
        self.wait()
        arrays = checkpoint_arrays(ckpt, copy=True)
        history = list(ckpt.histories[0]) if self.config is not None else None
        self._writer = threading.Thread(target=self._write, args=(arrays, ckpt.step, history),
                                        name=f"klayer checkpoint {ckpt.step}")
        _WRITERS.add(self._writer)
        self._writer.start()
        self.last_step = ckpt.step

    def _write(self, arrays: dict, step: int, history: list | None) -> None:
        try:
            write_checkpoint(self.path, arrays, step)
            if history is not None:
                write_history(self.path / HISTORY_FILE, history)
        except BaseException as exc:  # raised in the training thread by wait()
            self._write_error = exc
        finally:
            _WRITERS.discard(threading.current_thread())

    def wait(self) -> None:
        """Wait until the checkpoint in flight is on disk; raise what went wrong writing it."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    def whitening(self, fit):
        """The run's whitening: the one stored in whitening.npz when resuming, else
        ``fit()``, stored there (a resumed run then uses the very same arrays)."""
        from klayer.levers.whiten import Whitening

        path = None if self.path is None else self.path / WHITENING_FILE
        if self.resume and path.exists():
            arrays = read_npz(path.read_bytes(), path, advice="delete it to fit it again")
            try:
                meta = json.loads(str(arrays.pop("meta")))
                whitening = Whitening.from_arrays(arrays, meta)
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{path} is not a klayer whitening ({exc}); delete it to "
                                "fit it again") from None
            c = self.configs[0]
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


def read_npz(data: bytes, path: Path, advice: str | None = "restore it or retrain") -> dict:
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
