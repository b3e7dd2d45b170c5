"""The best MLP's results table in the README is what `experiments/seeds.py` prints on the
committed runs (docs/best_mlp/v3/seed0..2), and those runs are runs of
configs/best_mlp_v3.toml: the README's numbers cannot drift from the runs they describe."""

from __future__ import annotations

import json
import statistics

from conftest import REPO_ROOT
from klayer.config import TrainConfig
from test_experiments_seeds import load_seeds_script

RUNS = REPO_ROOT / "docs" / "best_mlp" / "v3"
CONFIG = REPO_ROOT / "configs" / "best_mlp_v3.toml"
SEEDS = (0, 1, 2)


def test_the_committed_runs_are_runs_of_the_config():
    config = TrainConfig.from_toml(CONFIG)
    for seed in SEEDS:
        run = TrainConfig.from_toml(RUNS / f"seed{seed}" / "config.toml")
        assert run.config_hash() == config.replace(seed=seed).config_hash(), seed
        summary = json.loads((RUNS / f"seed{seed}" / "summary.json").read_text())
        assert summary["steps"] == config.total_steps


def test_the_readme_table_is_what_seeds_py_prints_on_the_committed_runs(capsys):
    seeds = load_seeds_script()
    for seed in SEEDS:  # reused, never trained here
        assert seeds.finished(RUNS / f"seed{seed}"), seed
    argv = ["--config", str(CONFIG), "--seeds", *map(str, SEEDS), "--out", str(RUNS)]
    assert seeds.main(argv) == 0
    printed = capsys.readouterr().out
    printed = printed[printed.index("| seed |"):].strip()  # the table, after the command
    readme = (REPO_ROOT / "README.md").read_text()
    assert printed in readme
    tests = [json.loads((RUNS / f"seed{s}" / "summary.json").read_text())["final"]["test_accuracy"]
             for s in SEEDS]
    mean = statistics.mean(tests)
    assert mean >= 0.70  # the goal the README says is reached
    assert f"{100 * mean:.2f}%" in readme.split("### The best MLP klayer trains here", 1)[1][:200]


def test_the_measured_variant_row_is_its_committed_run():
    """docs/best-mlp.md's MixUp and label smoothing row is docs/best_mlp/v4/seed0, a run of
    configs/best_mlp_v4.toml, against the seed 0 of the three above."""
    run = REPO_ROOT / "docs" / "best_mlp" / "v4" / "seed0"
    config = TrainConfig.from_toml(REPO_ROOT / "configs" / "best_mlp_v4.toml")
    assert TrainConfig.from_toml(run / "config.toml").config_hash() == config.config_hash()
    final = json.loads((run / "summary.json").read_text())["final"]
    base = json.loads((RUNS / "seed0" / "summary.json").read_text())["final"]
    page = (REPO_ROOT / "docs" / "best-mlp.md").read_text(encoding="utf-8")
    [row] = [line for line in page.splitlines() if "`best_mlp_v4.toml`, seed 0 |" in line]
    delta = 100 * (final["test_accuracy"] - base["test_accuracy"])
    assert f"| {100 * final['test_accuracy']:.2f}% (validation {100 * final['val_accuracy']:.2f}%, " \
           f"training {100 * final['train_accuracy']:.2f}%) | {delta:+.2f} |".replace("-", "−") in row
