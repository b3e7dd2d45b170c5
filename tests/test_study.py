"""How the study schedules its jobs: the critical path first, the other runs beside it."""

from concurrent.futures import Future
from pathlib import Path

import pytest

from klayer import search
from klayer.study import sections as study
from klayer.search.executors import InProcessExecutor, Lanes


class ManualExecutor:
    """Records the jobs it is given; the test ends each one (finish)."""

    def __init__(self, capacity: int):
        self.capacity, self.blas_threads = capacity, 1
        self.started: list = []
        self.futures: dict = {}

    def submit(self, job: dict) -> Future:
        self.started.append(job["name"])
        self.futures[job["name"]] = Future()
        return self.futures[job["name"]]

    def finish(self, name: str) -> None:
        self.futures[name].set_result({"name": name})

    def close(self) -> None:
        pass


@pytest.fixture
def manual():
    executor = ManualExecutor(2)
    lanes = Lanes(executor)
    yield executor, lanes
    lanes.close()


def test_the_critical_path_goes_first_and_the_rest_fills_the_other_slots(manual):
    executor, lanes = manual
    lanes.reserve(2)
    rest = {name: lanes.rest.submit({"name": name}) for name in ("r0", "r1", "r2")}
    coarse = [lanes.critical.submit({"name": f"coarse{k}"}) for k in range(2)]
    lanes.settle()
    assert executor.started == ["coarse0", "coarse1"]
    executor.finish("coarse0")
    lanes.settle()
    assert executor.started == ["coarse0", "coarse1"]  # the reserved slot waits for the path
    assert coarse[0].result() == {"name": "coarse0"}
    executor.finish("coarse1")
    lanes.reserve(1)
    fine = lanes.critical.submit({"name": "fine"})
    lanes.settle()
    assert sorted(executor.started[2:]) == ["fine", "r0"]  # both workers busy
    executor.finish("fine")
    assert fine.result() == {"name": "fine"}
    lanes.critical.submit({"name": "final"})
    lanes.settle()
    assert executor.started[4:] == ["final"]  # next in line, ahead of r1
    executor.finish("r0")
    lanes.settle()
    assert executor.started[5:] == ["r1"]
    executor.finish("final")
    lanes.reserve(0)
    lanes.settle()
    assert executor.started[6:] == ["r2"]
    for name in ("r1", "r2"):
        executor.finish(name)
    assert [rest[name].result()["name"] for name in rest] == ["r0", "r1", "r2"]


def test_one_slot_runs_the_critical_path_then_the_rest():
    executor = ManualExecutor(1)
    lanes = Lanes(executor)
    try:
        lanes.reserve(2)  # at most the executor's one slot
        assert (lanes.critical.capacity, lanes.rest.capacity) == (1, 0)
        lanes.rest.submit({"name": "r0"})
        for name in ("coarse0", "coarse1"):
            lanes.critical.submit({"name": name})
        lanes.settle()
        assert executor.started == ["coarse0"]
        executor.finish("coarse0")
        lanes.settle()
        assert executor.started == ["coarse0", "coarse1"]
        executor.finish("coarse1")
        lanes.reserve(0)
        lanes.settle()
        assert executor.started == ["coarse0", "coarse1", "r0"]
    finally:
        lanes.close()


def test_a_failed_job_fails_its_future_and_closing_cancels_the_waiting_ones(manual):
    executor, lanes = manual
    lanes.reserve(1)
    failing = lanes.critical.submit({"name": "c0"})
    waiting = lanes.critical.submit({"name": "c1"})
    lanes.settle()
    executor.futures["c0"].set_exception(ValueError("diverged"))
    with pytest.raises(ValueError, match="diverged"):
        failing.result()
    lanes.settle()
    executor.finish("c1")
    assert waiting.result() == {"name": "c1"}
    lanes.reserve(2)
    left = [lanes.rest.submit({"name": "r0"})]
    lanes.close()
    assert left[0].cancelled()


class RecordingExecutor:
    """Two slots, each job trained here when it is handed over (one at a time); records
    which part of the study each job is."""

    capacity, blas_threads = 2, 1

    def __init__(self, out: Path):
        self.out, self.kinds, self.threads = out, [], []
        self.inner = InProcessExecutor(blas_threads=1)

    def submit(self, job: dict) -> Future:
        run_dir = Path(job.get("run_dir") or job["run_dirs"][0]).relative_to(self.out)
        kind = {"search": "coarse", "search-fine": "fine"}.get(run_dir.parts[0], "runs")
        if run_dir.name.startswith("final-"):
            kind = "final"
        self.kinds.append(kind)
        self.threads.append(job["blas_threads"])
        return self.inner.submit(job)

    def close(self) -> None:
        pass


TINY = study.Budget("tiny", subset=1000, n_s=10, n_s_search=5, cycles_final=1, fine_trials=2,
                    gradcheck_dims=4, gradcheck_samples=3, gradcheck_hidden_9=(6, 5))


@pytest.mark.slow
@pytest.mark.cifar
def test_the_study_submits_the_critical_path_first_and_reuses_everything_again(
        cifar_dir, tmp_path, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setattr(study, "gradcheck_section", lambda *args: [])  # not scheduled
    first = RecordingExecutor(out.resolve())
    monkeypatch.setattr(search, "make_executor", lambda workers: first)
    result = study.run_study(out, TINY, data_dir=str(cifar_dir), workers=2)
    assert first.kinds[:2] == ["coarse", "coarse"]  # nothing else before both populations
    assert first.kinds.index("fine") < first.kinds.index("final")
    assert sorted(first.kinds) == ["coarse", "coarse", "final", "fine", *["runs"] * 6]
    assert set(first.threads) == {1}
    assert set(result.seconds) == {"gradcheck", "runs", "search"}
    assert result.wall > 0 and result.workers == 2
    assert all(run.summary is not None for run in [*result.depth3, *result.init, result.final])

    again = RecordingExecutor(out.resolve())
    monkeypatch.setattr(search, "make_executor", lambda workers: again)
    reused = study.run_study(out, TINY, data_dir=str(cifar_dir), workers=2)
    assert again.kinds == []
    assert all(run.reused for run in [*reused.depth3, *reused.depth9, *reused.init, reused.final])
    assert reused.final.test_accuracy == result.final.test_accuracy
