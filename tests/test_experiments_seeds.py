"""experiments/seeds.py: one config over several seeds, measured from outside, one table."""

from __future__ import annotations

import importlib.util
import json
import statistics

import numpy as np
import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.cifar
TINY = ('hidden_sizes = [16]\nn_s = 10\ncycles = 1\nsubset = 600\nn_val = 200\n'
        'evals_per_cycle = 2\n')


def load_seeds_script():
    spec = importlib.util.spec_from_file_location("seeds", REPO_ROOT / "experiments" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trains_each_seed_measures_it_and_prints_the_mean(tmp_path, cifar_dir, capsys):
    seeds = load_seeds_script()
    config = tmp_path / "tiny.toml"
    config.write_text('hidden_sizes = [16]\nn_s = 10\ncycles = 1\nsubset = 600\nn_val = 200\n'
                      'ema = 0.9\nflip = true\nevals_per_cycle = 2\n')
    out = tmp_path / "runs"
    args = ["--config", str(config), "--seeds", "0", "1", "--out", str(out),
            "--data-dir", str(cifar_dir)]
    assert seeds.main(args) == 0
    printed = capsys.readouterr().out
    summaries = [json.loads((out / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    measured = [json.loads((out / f"seed{s}" / "measured.json").read_text()) for s in (0, 1)]
    assert summaries[0]["final"]["test_accuracy"] != summaries[1]["final"]["test_accuracy"] or \
        summaries[0]["final"]["train_loss"] != summaries[1]["final"]["train_loss"]  # two seeds
    for m in measured:
        assert m["wall_seconds"] > 0 and m["peak_rss_mib"] > 10
    tests = [s["final"]["test_accuracy"] for s in summaries]
    mean, std = 100 * statistics.mean(tests), 100 * statistics.stdev(tests)
    last = printed.strip().splitlines()[-1]
    assert last.startswith("| **mean ± std** | ") and f"**{mean:.2f} ± {std:.2f}**" in last
    plain = [s["final_without_ema"]["test_accuracy"] for s in summaries]
    assert f"{100 * statistics.mean(plain):.2f} ± " in last  # the plain weights' column
    for s, m in zip((0, 1), measured):
        row = next(line for line in printed.splitlines() if line.startswith(f"| {s} | "))
        assert f"{100 * summaries[s]['final']['test_accuracy']:.2f}%" in row
        assert f"{m['wall_seconds'] / 60:.1f} min" in row

    # run again: every seed is reused, nothing is trained, the same table
    before = [(out / f"seed{s}" / "measured.json").read_text() for s in (0, 1)]
    assert seeds.main(args) == 0
    again = capsys.readouterr().out
    assert "reusing" in again and again.split("\n\n", 1)[1] == printed.split("\n\n", 1)[1]
    assert [(out / f"seed{s}" / "measured.json").read_text() for s in (0, 1)] == before


def test_an_interrupted_seed_continues_where_it_stopped_and_finishes(tmp_path, cifar_dir,
                                                                      monkeypatch, capsys):
    """Seed 0's child is killed (SIGKILL) after update step 10 of 20: seeds.py stops with
    one line saying how to continue; run again, it resumes the run folder (not a new
    run) and ends where an uninterrupted run of the seed ends, bit for bit."""
    seeds = load_seeds_script()
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    data = ["--data-dir", str(cifar_dir)]
    out = tmp_path / "runs"
    args = ["--config", str(config), "--seeds", "0", "--out", str(out), *data]
    with monkeypatch.context() as m:
        m.setenv("KLAYER_FAULT", "step:10")
        with pytest.raises(SystemExit, match="seed 0 failed .* run the same command again"):
            seeds.main(args)
    run = out / "seed0"
    assert (run / "checkpoint.npz").is_file() and not (run / "summary.json").exists()
    assert not (run / "measured.json").exists()

    assert seeds.main(args) == 0
    measured = json.loads((run / "measured.json").read_text())
    assert measured["resumed"] is True and "--resume" in measured["command"]

    whole = tmp_path / "whole"
    assert seeds.main(["--config", str(config), "--seeds", "0", "--out", str(whole), *data]) == 0
    capsys.readouterr()
    done, reference = (json.loads((d / "seed0" / "summary.json").read_text())
                       for d in (out, whole))
    assert done["final"] == reference["final"]
    with np.load(run / "model.npz", allow_pickle=False) as a, \
            np.load(whole / "seed0" / "model.npz", allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
