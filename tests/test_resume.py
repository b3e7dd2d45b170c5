"""A ``klayer train`` killed (SIGKILL) at a chosen point, then ``--resume``d, ends with the
same model, bit for bit, as an uninterrupted run. The kill is deterministic: the
test-only hook ``KLAYER_FAULT`` (see :mod:`klayer.runs`) makes the process kill itself
right after an update step, or half-way through writing a checkpoint."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klayer import runs
from klayer import modelfile
from klayer.cli import main

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 10  # 500 training images in batches of 50
FLAGS = ["--subset", "500", "--hidden", "20,20", "--n-s", "15", "--cycles", "1",
         "--batch-size", "50", "--evals-per-cycle", "3", "--dtype", "float32",
         "--dropout", "0.1", "--optimizer", "momentum", "--eta-max", "0.05", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", "--data-dir", str(cifar_dir), *FLAGS, "--out", str(run)]) == 0
    return run


def _killed_run(cifar_dir, run, fault):
    proc = subprocess.run(
        [sys.executable, "-m", "klayer.cli", "train", "--data-dir", str(cifar_dir), *FLAGS,
         "--out", str(run)],
        env={**os.environ, "KLAYER_FAULT": fault, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _assert_same_model(run, straight):
    a, _, _ = modelfile.read_model(run)
    b, _, _ = modelfile.read_model(straight)
    assert a.params.keys() == b.params.keys() and a.buffers.keys() == b.buffers.keys()
    for k in (*b.params, *b.buffers):
        np.testing.assert_array_equal({**a.params, **a.buffers}[k],
                                      {**b.params, **b.buffers}[k], err_msg=k)
    assert (run / runs.HISTORY_FILE).read_bytes() == (straight / runs.HISTORY_FILE).read_bytes()
    assert runs.read_summary(run)["final"] == runs.read_summary(straight)["final"]


@pytest.mark.cifar
@pytest.mark.parametrize("fault, kill_step, kept_step, kept_previous", [
    ("step:25", 25, 20, 10),  # mid-epoch: the end of epoch 2 is kept
    ("step:20", 20, 10, 0),  # right after the last step of epoch 2, before its checkpoint
    ("checkpoint:20", 20, 10, 0),  # half-way through writing the checkpoint of step 20
])
def test_killed_run_resumes_bit_identical(cifar_dir, tmp_path, uninterrupted, fault,
                                          kill_step, kept_step, kept_previous, capsys):
    run = tmp_path / "run"
    _killed_run(cifar_dir, run, fault)

    # what survives: the config, the last two finished epochs' checkpoints and the history
    # up to the newest; no model or summary; at most a temporary file, which is never read
    names = set(os.listdir(run))
    temporary = {n for n in names if n.endswith(".tmp")}
    assert names - temporary == {runs.LOCK_FILE, runs.CONFIG_FILE, runs.CHECKPOINT_FILE,
                                 runs.PREVIOUS_CHECKPOINT_FILE, runs.HISTORY_FILE}
    if fault.startswith("checkpoint"):
        [tmp] = temporary  # the half-written checkpoint of step 20
        assert tmp.startswith(f".{runs.CHECKPOINT_FILE}.")
        with pytest.raises(ValueError, match="truncated"):
            runs._read_checkpoint(run / tmp)
    else:
        assert not temporary
    ckpt = runs.load_checkpoint(run)  # no warning: the newest is whole
    assert ckpt.step == kept_step and ckpt.epoch == kept_step // STEPS_PER_EPOCH
    assert 0 < kill_step - ckpt.step <= STEPS_PER_EPOCH  # at most one epoch lost
    assert runs.load_checkpoint(run).histories[0] == \
        [r for r in runs.read_history(uninterrupted / runs.HISTORY_FILE) if r["step"] <= kept_step]
    with np.load(run / runs.PREVIOUS_CHECKPOINT_FILE) as previous:
        assert '"step": %d,' % kept_previous in str(previous["meta"])

    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert not any(n.endswith(".tmp") for n in os.listdir(run))
    _assert_same_model(run, uninterrupted)


@pytest.mark.cifar
def test_truncated_newest_checkpoint_resumes_from_the_previous(cifar_dir, tmp_path,
                                                                uninterrupted, capsys):
    run = tmp_path / "run"
    _killed_run(cifar_dir, run, "step:25")
    newest = run / runs.CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith(f"klayer train: warning: {newest} is truncated")
    assert warning.endswith("checkpoint.prev.npz (step 10)")
    _assert_same_model(run, uninterrupted)


@pytest.mark.cifar
def test_restart_after_both_checkpoints_are_lost(cifar_dir, tmp_path, uninterrupted, capsys):
    run = tmp_path / "run"
    _killed_run(cifar_dir, run, "step:25")
    for name in (runs.CHECKPOINT_FILE, runs.PREVIOUS_CHECKPOINT_FILE):
        (run / name).write_bytes(b"")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable checkpoint" in err
    advice = f"klayer train --restart --config {run / runs.CONFIG_FILE} --out {run}"
    assert f"`{advice}`" in err
    argv = ["train", "--data-dir", str(cifar_dir), *FLAGS, "--out", str(run)]
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*advice.split()[1:], "--quiet"]) == 0  # the command the error advised
    _assert_same_model(run, uninterrupted)


def test_restart_and_resume_exclude_each_other(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--restart"]) == 2
    assert "drop --restart" in capsys.readouterr().err
