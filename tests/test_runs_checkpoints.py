"""Checkpoints that recover: the last two kept, a damaged newest falls back to the one
before (with a warning) and still resumes exactly; --restart starts a run folder again."""

import os
import threading
import time
import warnings

import numpy as np
import pytest

from klayer import runs
from klayer.config import TrainConfig
from klayer.train import TrainEvent, train

SMALL = TrainConfig(hidden_sizes=(16, 12), n_s=10, cycles=2, batch_size=20, eta_max=1.0,
                    evals_per_cycle=4, subset=None, optimizer="momentum", dropout=0.1)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    monkeypatch.setattr("klayer.plots.plot_history", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    return train(SMALL, data, tmp_path_factory.mktemp("straight"))


def _stop_after_epoch(epoch):
    def callback(event: TrainEvent):
        if event.kind == "epoch" and event.epoch == epoch:
            raise KeyboardInterrupt

    return callback


def _interrupted(data, run, epoch=3):
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, data, run, callbacks=[_stop_after_epoch(epoch)])


def _assert_same(result, straight):
    for k in straight.network.params:
        np.testing.assert_array_equal(result.network.params[k], straight.network.params[k])
    for k in straight.network.buffers:
        np.testing.assert_array_equal(result.network.buffers[k], straight.network.buffers[k])
    assert result.history == straight.history and result.final == straight.final


def test_the_last_two_checkpoints_are_kept(data, tmp_path):
    _interrupted(data, tmp_path)
    assert runs.load_checkpoint(tmp_path).step == 30
    assert runs._read_checkpoint(tmp_path / runs.PREVIOUS_CHECKPOINT_FILE).step == 20
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete"])
def test_damaged_newest_falls_back_and_resumes_exactly(data, tmp_path, straight, damage):
    _interrupted(data, tmp_path)
    newest = tmp_path / runs.CHECKPOINT_FILE
    raw = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(raw[:len(raw) // 3])
    elif damage == "flip a byte":  # inside an array: only the zip CRC can tell
        i = raw.index(b"param.W2.npy") + 300
        newest.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    else:
        newest.unlink()
    with pytest.warns(runs.CheckpointWarning, match=r"resuming from the previous checkpoint "
                                                    r".*checkpoint\.prev\.npz \(step 20\)"):
        resumed = train(SMALL, data, tmp_path, resume=True)
    _assert_same(resumed, straight)
    # the damaged file was dropped, not rotated in place of the good one
    assert runs._read_checkpoint(tmp_path / runs.PREVIOUS_CHECKPOINT_FILE).step == 30


def test_no_usable_checkpoint_then_restart(data, tmp_path, straight):
    _interrupted(data, tmp_path)
    for name in (runs.CHECKPOINT_FILE, runs.PREVIOUS_CHECKPOINT_FILE):
        (tmp_path / name).write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*; start the run again "
                                         r"with `klayer train --restart --config .*config.toml --out"):
        train(SMALL, data, tmp_path, resume=True)
    with pytest.raises(ValueError, match="already holds a run.*--restart"):
        train(SMALL, data, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(train(SMALL, data, tmp_path, restart=True), straight)
    assert runs.load_checkpoint(tmp_path).step == SMALL.total_steps


def test_restart_replaces_a_finished_run_with_another_config(data, tmp_path):
    train(SMALL, data, tmp_path)
    (tmp_path / "confusion.png").write_bytes(b"from the old model")
    other = SMALL.replace(lam=0.01, cycles=1)
    result = train(other, data, tmp_path, restart=True)
    assert runs.read_config(tmp_path).lam == 0.01
    assert runs.read_summary(tmp_path)["steps"] == result.steps == 20
    assert not (tmp_path / "confusion.png").exists()
    with pytest.raises(ValueError, match="not both"):
        train(other, data, tmp_path, resume=True, restart=True)


def test_temporary_files_of_a_killed_writer_are_never_read(data, tmp_path, straight):
    _interrupted(data, tmp_path)
    stale = tmp_path / f".{runs.CHECKPOINT_FILE}.99999.tmp"
    stale.write_bytes((tmp_path / runs.CHECKPOINT_FILE).read_bytes()[:100])
    assert runs.load_checkpoint(tmp_path).step == 30
    resumed = train(SMALL, data, tmp_path, resume=True)
    assert not stale.exists()
    _assert_same(resumed, straight)


def test_checkpoint_rotation_is_atomic_at_each_rename(tmp_path, monkeypatch):
    """Killed between the two renames, the folder holds the previous checkpoint only,
    and loading falls back to it."""
    ckpt = runs.Checkpoint(step=10, epoch=1, params={"W1": np.ones((2, 2))}, buffers={},
                           running_initialised=False, optimizer_state={}, rng_state={},
                           histories=[[]], timings={}, config_hash="h")
    runs.save_checkpoint(tmp_path, ckpt)
    replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed here
        replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(tmp_path, runs.Checkpoint(**{**vars(ckpt), "step": 20}))
    monkeypatch.setattr(runs.os, "replace", replace)
    assert sorted(os.listdir(tmp_path)) == [runs.PREVIOUS_CHECKPOINT_FILE]
    with pytest.warns(runs.CheckpointWarning, match="checkpoint.npz is missing"):
        assert runs.load_checkpoint(tmp_path).step == 10


# --- checkpoints written by a thread while training goes on -------------------------------


def _checkpoint(step, W):
    return runs.Checkpoint(step=step, epoch=1, params={"W1": W}, buffers={},
                           running_initialised=False, optimizer_state={}, rng_state={},
                           histories=[[], []], timings={},
                           config_hash=runs.configs_hash([SMALL, SMALL]))


def _held_back(monkeypatch):
    """write_checkpoint waits for a permit of the returned semaphore: the test decides
    when each disk write happens."""
    permits, write = threading.Semaphore(0), runs.write_checkpoint

    def waits(*args):
        assert permits.acquire(timeout=10)
        write(*args)

    monkeypatch.setattr(runs, "write_checkpoint", waits)
    return permits


def test_a_checkpoint_holds_the_state_when_it_was_taken(tmp_path, monkeypatch):
    """The weights change in place during the steps that run while the thread writes."""
    permits = _held_back(monkeypatch)
    W = np.ones((2, 3))
    with runs.RunFolder(tmp_path, [SMALL, SMALL]) as folder:
        folder.checkpoint(_checkpoint(10, W))
        W += 1.0  # the next update
        permits.release()
    np.testing.assert_array_equal(runs.load_checkpoint(tmp_path).params["W1"], np.ones((2, 3)))


def test_the_next_checkpoint_and_leaving_the_folder_wait_for_the_one_in_flight(
        tmp_path, monkeypatch):
    permits = _held_back(monkeypatch)
    with runs.RunFolder(tmp_path, [SMALL, SMALL]) as folder:
        folder.checkpoint(_checkpoint(10, np.ones((2, 3))))
        assert not (tmp_path / runs.CHECKPOINT_FILE).exists()  # still in flight
        threading.Timer(0.2, permits.release).start()
        folder.checkpoint(_checkpoint(20, np.zeros((2, 3))))  # waits for step 10's
        assert runs.load_checkpoint(tmp_path).step == 10
        permits.release()
    assert runs.load_checkpoint(tmp_path).step == 20  # on disk once the folder is left
    assert runs._read_checkpoint(tmp_path / runs.PREVIOUS_CHECKPOINT_FILE).step == 10


def test_a_failed_checkpoint_write_is_raised_where_training_runs(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "write_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
        with runs.RunFolder(tmp_path, [SMALL, SMALL]) as folder:
            folder.checkpoint(_checkpoint(10, np.ones((2, 3))))
            folder.checkpoint(_checkpoint(20, np.ones((2, 3))))  # raises the first one's
    with pytest.raises(OSError, match="No space left"):  # leaving the folder raises it
        with runs.RunFolder(tmp_path, [SMALL, SMALL], restart=True) as folder:
            folder.checkpoint(_checkpoint(10, np.ones((2, 3))))
    with pytest.raises(KeyboardInterrupt):  # the error that stopped the run comes first
        with runs.RunFolder(tmp_path, [SMALL, SMALL], restart=True) as folder:
            folder.checkpoint(_checkpoint(10, np.ones((2, 3))))
            raise KeyboardInterrupt
    with runs.RunFolder(tmp_path, [SMALL, SMALL], restart=True):  # the lock was let go
        pass


def test_a_slow_disk_changes_no_file_of_the_run(data, tmp_path, monkeypatch, straight):
    """Every checkpoint is still being written when the next steps (and the final
    evaluation) run; the run's files are those of a run that waited for each."""
    write = runs.write_checkpoint

    def slow(*args):
        time.sleep(0.05)
        write(*args)

    monkeypatch.setattr(runs, "write_checkpoint", slow)
    result = train(SMALL, data, tmp_path)
    _assert_same(result, straight)
    assert runs.read_history(tmp_path / runs.HISTORY_FILE) == \
        runs.read_history(straight.run_dir / runs.HISTORY_FILE)
    assert runs.load_checkpoint(tmp_path).step == SMALL.total_steps
    assert not list(tmp_path.glob(".*.tmp"))
