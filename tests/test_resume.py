"""A ``klayer train`` killed (SIGKILL) at a chosen point, then ``--resume``d, ends with the
same model, bit for bit, as an uninterrupted run. The kill is deterministic: the
test-only hook ``KLAYER_FAULT`` (see :mod:`klayer.runs`) makes the process kill itself
right after an update step, or half-way through writing a checkpoint."""

import json
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


# --- kill -9 and resume on generated data: every optimizer, schedule and dtype -------------

def train_generated(options: dict, run_dir, resume: bool) -> None:
    """Train on small generated data (four classes from the signs of two of 20 inputs)."""
    from types import SimpleNamespace

    from klayer.config import TrainConfig
    from klayer.train import train

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 20))
    y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)
    data = SimpleNamespace(X_train=X[:200], y_train=y[:200], X_val=X[200:300],
                           y_val=y[200:300], X_test=X[300:], y_test=y[300:],
                           class_names=list("abcd"), standardizer=None)
    train(TrainConfig(**options), data, run_dir, resume=resume)


# the same in a process of its own (which KLAYER_FAULT may kill)
CHILD = ("import json, sys; sys.path.insert(0, sys.argv[4]); "
         "from test_resume import train_generated; "
         "train_generated(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == 'resume')")


SMALL = {"hidden_sizes": [16, 16], "n_s": 15, "cycles": 1, "batch_size": 20,
         "evals_per_cycle": 3, "dropout": 0.1, "eta_max": 0.05}  # 10 steps an epoch


def _child(options: dict, run: Path, mode: str, fault: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KLAYER_FAULT", None)
    if fault:
        env["KLAYER_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(options), str(run), mode,
                           str(REPO / "tests")],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("options", [
    {"optimizer": "sgd", "schedule": "cyclic", "dtype": "float64"},
    {"optimizer": "momentum", "schedule": "constant", "dtype": "float32"},
    {"optimizer": "adam", "schedule": "step", "decay_every": 7, "dtype": "float64",
     "eta_max": 0.01},
    {"optimizer": "sgd", "schedule": "cosine", "dtype": "float32"},
    {"optimizer": "adam", "schedule": "cosine", "warmup_steps": 8, "dtype": "float32",
     "eta_max": 0.01},
], ids=lambda o: "-".join(str(o[k]) for k in ("optimizer", "schedule", "dtype")) +
   ("-warmup" if o.get("warmup_steps") else ""))
def test_kill_9_and_resume_ends_bit_identical(options, tmp_path):
    """A training process killed (SIGKILL) at step 25 of 30, then resumed in a new
    process, ends with the model, history and summary of an uninterrupted run."""
    options = {**SMALL, **options}
    straight, run = tmp_path / "straight", tmp_path / "run"
    train_generated(options, straight, resume=False)  # in this process
    killed = _child(options, run, "new", fault="step:25")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run / runs.SUMMARY_FILE).exists()
    assert runs.load_checkpoint(run).step == 20  # the end of epoch 2: at most an epoch lost
    resumed = _child(options, run, "resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_model(run, straight)
