"""Where trials run: in the driver, in a pool of worker processes, or as Ray tasks.

One trial function, :func:`run_trial`, serves the search and the study: it trains one
TrainConfig into one run folder (resuming it from its checkpoint when it has one), or a
population of K TrainConfigs in lockstep (:func:`klayer.train.train_population`) into K
run folders, and returns the numbers the search records per member (a member that
diverged is a failure of its own, the others complete). An
executor's ``submit(job)`` returns a ``concurrent.futures.Future`` of those numbers;
``capacity`` is how many jobs (a trial or a population) it runs at once.

- In the driver and in a process pool, trials write their run folders directly, and
  each process loads the data once (:func:`dataset_for`).
- On Ray, a trial needs nothing from the worker's disk or environment: the driver loads
  and standardises the data once per data setting and ships it through the object store
  (``ray.put``; the reference is a task argument); klayer's own code travels with the
  job (``runtime_env`` ``py_modules``). The trial trains into a temporary folder on the
  worker and returns the folder's files as bytes; the driver writes them into the run
  folder under its own output folder. No shared filesystem is needed. The Ray node that
  ran a trial is recorded as "node" in its numbers (the search table) and its run
  folder's summary.json (:func:`_ray_trial`). A worker process
  that dies mid-trial is retried by Ray (``RAY_TASK_RETRIES``); after that the trial is
  recorded FAIL and retried by the next run of the search.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from klayer.config import TrainConfig
from klayer.nn.errors import UserError
from klayer.search.space import check_int

RAY_TASK_RETRIES = 2  # Ray reruns a trial whose worker process died this many times
# Test-only: a trial SIGKILLs its own process when it reaches this step (a worker that
# dies mid-trial, made deterministic). Ray trials see it when the driver has it set.
FAULT_HOOK = "KLAYER_FAULT"  # test-only fault injection (klayer.runs), passed on to Ray workers


# --- one trial, in any process --------------------------------------------------------------

_DATA: dict = {}  # this process's datasets, keyed by data_key


def data_key(config: TrainConfig) -> tuple:
    """The options that decide a trial's data: trials with the same key share it."""
    return (config.data_dir, config.protocol, config.n_val, config.subset, config.dtype)


def dataset_for(config: TrainConfig):
    """The data ``config`` trains on, loaded once per process."""
    from klayer.data import load_data

    key = data_key(config)
    if key not in _DATA:
        _DATA[key] = load_data(config, download=False)
    return _DATA[key]


def run_trial(job: dict, data=None) -> dict:
    """Train ``job["configs"]`` (TrainConfig dicts: one trial, or the K trials of a
    population, :func:`klayer.train.train_population`) into ``job["run_dirs"]`` (one per
    config; None: no files) with at most ``job["blas_threads"]`` BLAS threads.
    ``job["checkpoint_dir"]``: the population's checkpoint folder (resumed when it holds
    one; removed at the end); a trial alone checkpoints in its run folder and resumes
    from it. ``data``: the dataset (default: loaded here, once per process).
    ``job["return_run_folder"]``: train into a temporary folder instead and return each
    member's files under "run_folder" ({file name: bytes}) for the driver to write.
    ``job["train_history"]``: False to evaluate the training split at the last history
    point only (a search's trials; default True).

    Returns {"members": [...]}: per config its numbers, or {"fail_reason": ...} when it
    diverged; raises what training raises otherwise (ValueError, ...), which the driver
    records for every trial of the job.
    """
    from threadpoolctl import threadpool_limits

    configs = [TrainConfig.from_dict(c) for c in job["configs"]]
    with threadpool_limits(limits=job["blas_threads"], user_api="blas"):
        data = dataset_for(configs[0]) if data is None else data
        if not job.get("return_run_folder"):
            return _train(configs, data, job["run_dirs"], job.get("checkpoint_dir"),
                          job.get("train_history", True))
        with tempfile.TemporaryDirectory(prefix="klayer-trial-") as tmp:
            folders = [None if d is None else Path(tmp) / f"{k}" / Path(d).name
                       for k, d in enumerate(job["run_dirs"])]
            numbers = _train(configs, data, folders, None, job.get("train_history", True))
            for member, folder in zip(numbers["members"], folders):
                if folder is not None:
                    member["run_folder"] = read_run_folder(folder)
    return numbers


def _ray_trial(job: dict, data) -> dict:
    """:func:`run_trial` as a Ray task: its numbers and its run folder's summary.json
    also name the Ray node it ran on ("node")."""
    import json

    import ray

    from klayer import runs

    node = ray.get_runtime_context().get_node_id()
    numbers = run_trial(job, data)
    for member in numbers.get("members", [numbers]):
        member["node"] = node
        files = member.get("run_folder") or {}
        if runs.SUMMARY_FILE in files:
            summary = {**json.loads(files[runs.SUMMARY_FILE]), "node": node}
            files[runs.SUMMARY_FILE] = json.dumps(summary, indent=2).encode() + b"\n"
    return numbers


def _numbers(result, seconds: float) -> dict:
    """What the search records of a finished run (a TrainResult)."""
    return {
        "val_accuracy_final": float(result.final["val_accuracy"]),
        "val_accuracy_best": float(result.best_val_accuracy),
        "best_epoch": float(result.best_epoch),
        "test_accuracy": result.final.get("test_accuracy"),
        "seconds": seconds,
    }


def _train(configs, data, run_dirs, checkpoint_dir, train_history: bool = True) -> dict:
    """Train the configs (writing each member's run folder, a diverged member's too:
    config, history and the reason) and return each member's numbers or failure;
    ``train_history`` as in :func:`klayer.train.train_population`."""
    import shutil

    from klayer import runs
    from klayer.train import Dropped, train_population

    run_dirs = [None if d is None else Path(d) for d in run_dirs]
    own = checkpoint_dir is None and len(configs) == 1
    folder = run_dirs[0] if own else checkpoint_dir  # a trial alone: its run folder
    resume = folder is not None and any(  # a kill between the two renames leaves only .prev
        (Path(folder) / name).exists()
        for name in (runs.CHECKPOINT_FILE, runs.PREVIOUS_CHECKPOINT_FILE))
    start = time.perf_counter()
    results = train_population(configs, data, checkpoint_dir=folder, resume=resume,
                               run_dirs=run_dirs, train_history=train_history)
    seconds = time.perf_counter() - start  # the population's time, for every member
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"members": [{"fail_reason": f"diverged: {r.reason}"} if isinstance(r, Dropped)
                        else _numbers(r, seconds) for r in results]}


def read_run_folder(run_dir: Path) -> dict:
    """A finished run folder's files as {name: bytes} (temporary files left out)."""
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).iterdir())
            if p.is_file() and not p.name.startswith(".")}


def write_run_folder(run_dir: Path, files: dict, config: TrainConfig) -> None:
    """Write a run folder shipped back by :func:`run_trial` into ``run_dir``; config.toml
    names ``run_dir`` (not the worker's temporary folder). summary.json goes last, so a
    folder without it is unfinished."""
    from klayer import runs

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda name: name == runs.SUMMARY_FILE):
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"a trial returned a file with a bad name: {name!r}")
        if name == runs.CONFIG_FILE:
            runs.write_config(run_dir, config.replace(out=str(run_dir)))
        else:
            runs.atomic_write(run_dir / name, lambda f, data=files[name]: f.write(data))


# --- executors -------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class InProcessExecutor:
    """One worker: the driver trains each trial itself, when it is submitted."""

    capacity = 1

    def __init__(self, blas_threads: int | None = None):
        self.blas_threads = blas_threads or available_cores()

    def submit(self, job: dict) -> Future:
        future = Future()
        try:
            future.set_result(run_trial(job))
        except Exception as exc:  # recorded as a failed trial by the driver
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass


def _worker_start(parent: int, pids) -> None:
    """In a pool worker: say who it is, leave Ctrl-C to the driver, and exit if the
    driver dies."""
    pids.put(os.getpid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class PoolExecutor:
    """N worker processes ("spawn", started at the first trial), each limited to
    cores // N BLAS threads (or ``blas_threads``)."""

    def __init__(self, workers: int, blas_threads: int | None = None):
        self.capacity = workers
        self.blas_threads = blas_threads or max(1, available_cores() // workers)
        self.pool = None
        self.context = multiprocessing.get_context("spawn")
        self.pids = None  # each worker puts its pid here when it starts

    def submit(self, job: dict) -> Future:
        if self.pool is None:
            self.pids = self.context.SimpleQueue()
            self.pool = ProcessPoolExecutor(
                self.capacity, mp_context=self.context, initializer=_worker_start,
                initargs=(os.getpid(), self.pids))
        try:
            return self.pool.submit(run_trial, job)
        except BrokenProcessPool:  # a worker died (killed, out of memory): a new pool
            self.close()  # the trials it ran have failed with BrokenProcessPool
            return self.submit(job)

    def close(self) -> None:
        if self.pool is None:
            return
        # Running trials are not waited for (an interrupted search reruns them).
        # ProcessPoolExecutor has no public way to stop its workers before Python 3.14
        # (kill_workers): the workers reported their pids when they started.
        while not self.pids.empty():
            try:
                os.kill(self.pids.get(), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pids.close()
        self.pool = None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, an optional extra: pip install 'klayer[ray]'") from None
    return ray


def _no_cluster(address: str) -> UserError:
    return UserError(f"--ray {address}: no Ray cluster answers at this address; start one "
                     "with `ray start --head` and pass its HOST:PORT, or use --ray local")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a HOST:PORT address: ``ray.init`` would retry
    for minutes before giving up."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", "local", "ray://...": Ray resolves and reports these itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        raise _no_cluster(address) from None


class RayExecutor:
    """Trials as Ray tasks on a Ray cluster, each reserving as many CPUs as its BLAS
    threads (default 1); see the module docstring for what travels where.

    address: of an existing cluster ("auto", "HOST:PORT", "ray://host:10001", ...) or
    "local" to start one here; connected at the first trial. If this process is already
    connected to Ray, that connection is used. capacity: trials in flight (default: the
    cluster's CPUs).
    """

    def __init__(self, address: str, capacity: int | None = None,
                 blas_threads: int | None = None):
        self.ray = _import_ray()
        self.address, self.task, self.started = address, None, False
        self._capacity = capacity
        self.blas_threads = blas_threads or 1
        self.data_refs: dict = {}  # data_key -> ObjectRef of the dataset

    def _connect(self) -> None:
        if self.task is not None:
            return
        if not self.ray.is_initialized():
            import klayer

            env = {"py_modules": [klayer]}
            if os.environ.get(FAULT_HOOK):
                env["env_vars"] = {FAULT_HOOK: os.environ[FAULT_HOOK]}
            _check_reachable(self.address)
            try:
                self.ray.init(address=None if self.address == "local" else self.address,
                              include_dashboard=False, logging_level="warning",
                              runtime_env=env)
            except ConnectionError:  # Ray's message names its own --address flag
                raise _no_cluster(self.address) from None
            self.started = True
        self.task = self.ray.remote(num_cpus=self.blas_threads,
                                    max_retries=RAY_TASK_RETRIES)(_ray_trial)

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._connect()
            cpus = int(self.ray.cluster_resources().get("CPU", 1))
            self._capacity = max(1, cpus // self.blas_threads)
        return self._capacity

    def submit(self, job: dict) -> Future:
        self._connect()
        configs = [TrainConfig.from_dict(c) for c in job["configs"]]
        key = data_key(configs[0])
        if key not in self.data_refs:  # loaded and standardised once, here
            self.data_refs[key] = self.ray.put(dataset_for(configs[0]))
        ref = self.task.remote({**job, "return_run_folder": True}, self.data_refs[key])
        future = Future()

        def done(task_future):  # in a Ray thread, when the task ends
            try:
                numbers = task_future.result()
                for member, config, run_dir in zip(numbers["members"], configs,
                                                   job["run_dirs"]):
                    files = member.pop("run_folder", None)
                    if files is not None:
                        write_run_folder(Path(run_dir), files, config)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(numbers)

        ref.future().add_done_callback(done)
        return future

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class Lanes:
    """One executor shared by two lanes of jobs: the critical path, on the slots it
    reserves (:meth:`reserve`), and the rest, on the others. A slot is one job running
    (``executor.capacity`` of them). A reserved slot stays the critical path's even while
    it has no job in it, so the critical path's next job never waits behind another one.

    ``lanes.critical`` and ``lanes.rest`` have the executor interface the search driver
    and :func:`klayer.study.sections.run_all` use (``submit``, ``capacity``, ``blas_threads``,
    ``close``); closing a lane does nothing, :meth:`close` stops both and the executor
    is its owner's to close. Jobs wait in their lane, in submission order, and one
    dispatching thread hands them to the executor (never a callback of the executor:
    a process pool's result thread must not submit). ``seconds`` of a lane: the sum of
    its jobs' times, each from its start to its end.
    """

    def __init__(self, executor):
        self.executor = executor
        self.critical, self.rest = _Lane(self), _Lane(self)
        self.reserved = 0
        self.closed = False
        self.dispatching = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._dispatch, name="klayer-lanes", daemon=True)
        self.thread.start()

    def reserve(self, slots: int) -> None:
        """Give the critical path ``slots`` slots (at most the executor's), the rest the
        others."""
        with self.changed:
            self.reserved = min(slots, self.executor.capacity)
            self.changed.notify_all()

    def share(self, lane) -> int:
        return self.reserved if lane is self.critical else self.executor.capacity - self.reserved

    def settle(self) -> None:
        """Wait until every job that may start has been handed to the executor (for tests:
        what has not been submitted then is waiting for a slot)."""
        with self.changed:
            self.changed.wait_for(lambda: not self.dispatching and self._next() is None)

    def close(self) -> None:
        """Stop dispatching; jobs still waiting are cancelled, running ones are the
        executor's (closing it stops them)."""
        with self.changed:
            self.closed = True
            waiting = [future for lane in (self.critical, self.rest) for _, future in lane.waiting]
            for lane in (self.critical, self.rest):
                lane.waiting.clear()
            self.changed.notify_all()
        for future in waiting:
            future.cancel()
        # Not joined: in the driver's own executor, the dispatching thread may be training
        # a job, which an interrupted study does not wait for (the thread is a daemon).

    def _submit(self, lane, job: dict) -> Future:
        future = Future()
        with self.changed:
            if self.closed:
                raise RuntimeError("a job was submitted after the lanes were closed")
            lane.waiting.append((job, future))
            self.changed.notify_all()
        return future

    def _next(self):
        """The lane whose next job may start now (the critical path's first), or None."""
        for lane in (self.critical, self.rest):
            if lane.waiting and lane.running < self.share(lane):
                return lane
        return None

    def _dispatch(self) -> None:
        while True:
            with self.changed:
                self.dispatching = False
                self.changed.notify_all()
                self.changed.wait_for(lambda: self.closed or self._next() is not None)
                if self.closed:
                    return
                lane = self._next()
                job, future = lane.waiting.popleft()
                lane.running += 1
                self.dispatching = True
            start = time.perf_counter()
            try:
                inner = self.executor.submit(job)  # an in-process executor runs it here
            except BaseException as exc:  # not submitted: the job's failure
                inner = Future()
                inner.set_exception(exc)
            inner.add_done_callback(lambda inner, lane=lane, future=future, start=start:
                                    self._finished(lane, future, start, inner))

    def _finished(self, lane, future: Future, start: float, inner: Future) -> None:
        with self.changed:  # the slot is free before anyone learns the result
            lane.running -= 1
            lane.seconds += time.perf_counter() - start
            self.changed.notify_all()
        if inner.cancelled():
            future.cancel()
        elif inner.exception() is not None:
            future.set_exception(inner.exception())
        else:
            future.set_result(inner.result())


class _Lane:
    """One lane of :class:`Lanes`, with an executor's interface."""

    def __init__(self, lanes: Lanes):
        self.lanes = lanes
        self.waiting: deque = deque()  # (job, future)
        self.running = 0
        self.seconds = 0.0

    @property
    def capacity(self) -> int:
        return self.lanes.share(self)

    @property
    def blas_threads(self) -> int:
        return self.lanes.executor.blas_threads

    def submit(self, job: dict) -> Future:
        return self.lanes._submit(self, job)

    def close(self) -> None:
        pass  # the lanes and the executor are closed by their owner


def make_executor(workers: int = 1, ray_address: str | None = None,
                  blas_threads: int | None = None):
    """Where trials run: Ray tasks, a process pool, or the driver itself.

    blas_threads: per trial (default: cores // workers; 1 on Ray). Training results are
    bit-identical only at equal BLAS threads: OpenBLAS sums in another order with more
    threads, and over thousands of float32 steps this moves accuracies by ~0.5%.
    """
    check_int(workers, "workers", 1)
    if blas_threads is not None:
        check_int(blas_threads, "blas_threads", 1)
    if ray_address:
        return RayExecutor(ray_address, workers if workers > 1 else None, blas_threads)
    if workers > 1:
        return PoolExecutor(workers, blas_threads)
    return InProcessExecutor(blas_threads)
