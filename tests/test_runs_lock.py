"""Folder locks: one writer per folder, a clear error for the second, and a lock left by
a killed process taken over. Two real processes; the holder signals through a pipe."""

import os
import signal
import subprocess
import sys

from pathlib import Path

import pytest

from klayer import runs
from klayer.config import TrainConfig
from klayer.train import train

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys
from klayer import runs
with runs.folder_lock(sys.argv[1], "klayer train"):
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the test writes a line (or kills us)
print("released", flush=True)
"""


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock of tmp_path/run; returns (process, folder)."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == "locked\n"  # blocks until the lock is held
    yield proc, folder
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_second_writer_gets_one_line_naming_the_holder(holder):
    proc, folder = holder
    assert (folder / runs.LOCK_FILE).read_text() == f"{proc.pid} klayer train\n"
    with pytest.raises(runs.FolderInUseError) as info:
        with runs.folder_lock(folder, "klayer train"):
            pass
    assert str(info.value) == (f"run folder {folder} is in use by process {proc.pid} "
                               "(klayer train); wait for it or use another --out")
    assert isinstance(info.value, OSError)  # the command line prints it as one line
    proc.stdin.write("done\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "released\n"
    assert proc.wait() == 0
    with runs.folder_lock(folder, "klayer search", kind="search folder"):
        assert (folder / runs.LOCK_FILE).read_text() == f"{os.getpid()} klayer search\n"
    assert (folder / runs.LOCK_FILE).read_text() == ""  # released: no holder named


def test_lock_of_a_killed_holder_is_taken_over(holder):
    proc, folder = holder
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (folder / runs.LOCK_FILE).read_text() == f"{proc.pid} klayer train\n"  # stale
    with runs.folder_lock(folder, "klayer train"):
        assert (folder / runs.LOCK_FILE).read_text() == f"{os.getpid()} klayer train\n"


def test_train_refuses_a_folder_in_use(holder, data):
    proc, folder = holder
    config = TrainConfig(hidden_sizes=(8,), n_s=5, cycles=1, batch_size=20, evals_per_cycle=1)
    with pytest.raises(runs.FolderInUseError, match=f"in use by process {proc.pid}"):
        train(config, data, folder)
    assert sorted(os.listdir(folder)) == [runs.LOCK_FILE]  # nothing written by the loser


def test_lock_within_one_process(tmp_path):
    """flock locks belong to open files: a second open in the same process conflicts too."""
    with runs.folder_lock(tmp_path, "klayer reproduce", kind="reproduction folder"):
        with pytest.raises(runs.FolderInUseError, match=f"reproduction folder {tmp_path} is in "
                                                        f"use by process {os.getpid()}"):
            with runs.folder_lock(tmp_path, "klayer reproduce", kind="reproduction folder"):
                pass


def test_klayer_train_on_a_folder_in_use_is_one_line(holder, data, monkeypatch, capsys):
    from klayer.cli import main

    proc, folder = holder
    loaded = []  # the generated data stands in for CIFAR-10 (klayer train calls load_data)
    monkeypatch.setattr("klayer.data.load_data",
                        lambda *args, **kwargs: loaded.append(1) or data)
    assert main(["train", "--hidden", "8", "--n-s", "5", "--cycles", "1", "--batch-size", "20",
                 "--out", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"klayer train: error: run folder {folder} is in use by process {proc.pid} "
                   "(klayer train); wait for it or use another --out\n")
    assert loaded == [1]
