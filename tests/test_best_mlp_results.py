"""The best MLP's results table in the README is what `experiments/seeds.py` prints on the
committed runs (docs/best_mlp/v7/seed0..2), and those runs are runs of
configs/best_mlp_v7.toml: the README's numbers cannot drift from the runs they describe.
The same holds for the three runs of configs/best_mlp_v6.toml, best_mlp_v5.toml and
best_mlp_v3.toml."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import REPO_ROOT
from klayer.config import TrainConfig
from test_experiments_seeds import load_seeds_script

RUNS = REPO_ROOT / "docs" / "best_mlp" / "v7"
CONFIG = REPO_ROOT / "configs" / "best_mlp_v7.toml"
SEEDS = (0, 1, 2)


def _final(run, key="final") -> dict:
    """A committed run's final numbers (``final_without_ema``: its plain weights')."""
    return json.loads((run / "summary.json").read_text())[key]


def _accuracies(runs, key="final") -> list[float]:
    """Test accuracy in percent of seeds 0, 1, 2 in the folder ``runs``."""
    return [100 * _final(runs / f"seed{s}", key)["test_accuracy"] for s in SEEDS]


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


@pytest.mark.parametrize("runs, config", [(RUNS, CONFIG),
                                          (RUNS.parent / "v6", CONFIG.parent / "best_mlp_v6.toml"),
                                          (RUNS.parent / "v5", CONFIG.parent / "best_mlp_v5.toml"),
                                          (RUNS.parent / "v3", CONFIG.parent / "best_mlp_v3.toml")])
def test_the_committed_runs_are_runs_of_the_config(runs, config):
    config = TrainConfig.from_toml(config)
    for seed in SEEDS:
        run = TrainConfig.from_toml(runs / f"seed{seed}" / "config.toml")
        assert run.config_hash() == config.replace(seed=seed).config_hash(), seed
        summary = json.loads((runs / f"seed{seed}" / "summary.json").read_text())
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
    mean = statistics.mean(_accuracies(RUNS))
    # the README shows the best configuration
    for other in ("v6", "v5", "v3"):
        assert mean > statistics.mean(_accuracies(RUNS.parent / other)), other
    assert f"{mean:.2f}%" in readme.split("### The best MLP klayer trains here", 1)[1][:200]
    assert f"reaches {mean:.2f}% test accuracy" in " ".join(readme[:1500].split())


def _ablation_runs():
    """(row, run folder, seeds.py command) for each row of docs/best-mlp.md's ablation that
    names one committed run: ``(run in `docs/best_mlp/NAME/seedN/`...)``."""
    page = (REPO_ROOT / "docs" / "best-mlp.md").read_text(encoding="utf-8")
    found = []
    for row in page.splitlines():
        if row.startswith("|") and "(run in `docs/best_mlp/" in row:
            folder = row.split("(run in `", 1)[1].split("`", 1)[0]
            command = row.split("`python experiments/seeds.py ", 1)[1].split("`", 1)[0]
            found.append((row, REPO_ROOT / folder, command))
    return found


def _config_of(command: str, seed: int) -> TrainConfig:
    """The configuration an ``experiments/seeds.py`` command trains for ``seed``: its
    ``--config`` file with the flags after ``--``, as ``klayer train`` reads them."""
    import shlex

    from klayer.cli import build_parser
    from klayer.config import flags_given

    tokens = shlex.split(command)
    extra = tokens[tokens.index("--") + 1:] if "--" in tokens else []
    config_file = tokens[tokens.index("--config") + 1]
    args = build_parser().parse_args(["train", "--config", config_file, "--seed", str(seed),
                                      *extra])
    return TrainConfig.from_toml(REPO_ROOT / config_file).with_overrides(flags_given(args))


def test_every_single_run_row_of_the_ablation_is_its_run_and_its_command():
    """Each row that names a committed run quotes that run's test accuracy (and its
    validation and training accuracies when it gives them), its difference to the same
    seed of the README's configuration and its wall time when it gives one, and the
    row's command (the config plus the flags after ``--``, the run's seed) gives exactly
    the configuration the run saved. A row says which seed it ran unless it is seed 0."""
    import shlex

    rows = _ablation_runs()
    assert len(rows) >= 3, [r[1] for r in rows]
    for row, run, command in rows:
        seed = int(run.name.removeprefix("seed"))
        tokens = shlex.split(command)
        assert tokens[tokens.index("--seeds") + 1] == str(seed), (run, command)
        saved = TrainConfig.from_toml(run / "config.toml")
        assert saved.config_hash() == _config_of(command, seed).config_hash(), run
        final = _final(run)
        test = final["test_accuracy"]
        cells = [c.strip() for c in row.split("|")]
        if seed:
            assert cells[1].endswith(f", seed {seed}"), (run, cells[1])
        assert cells[2].startswith(f"{100 * test:.2f}%"), (run, cells[2])
        if "(validation" in cells[2]:
            assert cells[2] == f"{100 * test:.2f}% (validation {100 * final['val_accuracy']:.2f}%, " \
                               f"training {100 * final['train_accuracy']:.2f}%)", (run, cells[2])
        if cells[3]:  # the difference to the same seed of best_mlp_v7.toml
            base = _final(RUNS / f"seed{seed}")["test_accuracy"]
            assert cells[3] == _signed(100 * (test - base)), (run, cells[3])
        if " min)" in cells[4]:  # the wall time experiments/seeds.py measured for the run
            minutes = json.loads((run / "measured.json").read_text())["wall_seconds"] / 60
            assert cells[4].endswith(f", {minutes:.1f} min)"), (run, cells[4])


def test_every_three_seed_row_of_the_ablation_is_its_runs():
    """Each row that names three committed runs (``(runs in `docs/best_mlp/NAME/`)``)
    quotes seed 0's test accuracy, the mean ± std of the three and their differences to
    best_mlp_v7.toml's seed 0 and mean; the row after it, the same runs'
    ``final_without_ema``, does the same for the plain weights. The row's command
    trains exactly the three committed runs."""
    page = (REPO_ROOT / "docs" / "best-mlp.md").read_text(encoding="utf-8")
    table = page.split("## What each option is worth", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]

    base = _accuracies(RUNS)
    checked = []
    for i, line in enumerate(lines):
        if "(runs in `docs/best_mlp/" not in line:
            continue
        runs = REPO_ROOT / line.split("(runs in `", 1)[1].split("`", 1)[0]
        command = line.split("`python experiments/seeds.py ", 1)[1].split("`", 1)[0]
        for seed in SEEDS:  # the row's command trains exactly the committed runs
            saved = TrainConfig.from_toml(runs / f"seed{seed}" / "config.toml")
            assert saved.config_hash() == _config_of(command, seed).config_hash(), (runs, seed)
        for row, key in ((line, "final"), (lines[i + 1], "final_without_ema")):
            cells = [c.strip() for c in row.split("|")]
            got = _accuracies(runs, key)
            if key == "final":
                want = f"{got[0]:.2f}% (mean of 3: {statistics.mean(got):.2f} ± " \
                       f"{statistics.stdev(got):.2f}%)"
            else:
                assert "final_without_ema" in row, row
                want = f"{got[0]:.2f}% (mean of 3: {statistics.mean(got):.2f}%)"
            assert cells[2].replace("**", "") == want, (runs, key, cells[2])
            if runs == RUNS and key == "final":
                assert cells[3] == "", cells[3]
            else:
                assert cells[3] == f"{_signed(got[0] - base[0])} (mean " \
                                   f"{_signed(statistics.mean(got) - statistics.mean(base))})", \
                    (runs, key, cells[3])
        checked.append(runs.name)
    assert checked[0] == RUNS.name and len(checked) >= 3, checked


def test_the_accuracy_against_time_table_is_the_committed_runs():
    """docs/best-mlp.md's "Accuracy against time" rows quote the committed runs' test
    accuracies and the wall times `experiments/seeds.py` measured (measured.json)."""
    page = (REPO_ROOT / "docs" / "best-mlp.md").read_text(encoding="utf-8")
    table = page.split("## Accuracy against time", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:5]]
            for line in table.splitlines() if line.startswith("| ") and "epochs" in line}
    root = REPO_ROOT / "docs" / "best_mlp"

    def minutes(run):
        return json.loads((run / "measured.json").read_text())["wall_seconds"] / 60

    def mean_of_3(name):
        runs = [root / name / f"seed{s}" for s in SEEDS]
        return (f"{statistics.mean(_accuracies(root / name)):.2f}% (3 seeds)",
                f"{statistics.mean(map(minutes, runs)):.1f} min (mean of 3)")

    expected = {
        "200 epochs": (f"{statistics.mean(_accuracies(root / 'v2')):.2f}% (3 seeds)",
                       f"{minutes(root / 'v2' / 'seed2'):.1f} min"),
        "300 epochs": mean_of_3("v3"),
        "350 epochs": mean_of_3("v5"),
        "350 epochs, first layer 1536": mean_of_3("v5_w1536"),
        "350 epochs, first layer 1536, batch 512": mean_of_3("v6"),
        "350 epochs, first layer 1536, batch 512, η up to 0.03": mean_of_3("v7"),
    }
    for budget, (accuracy, wall) in expected.items():
        assert rows[budget][0] == accuracy, budget
        assert rows[budget][1].startswith(wall), (budget, rows[budget][1])


SEARCH_LR = REPO_ROOT / "docs" / "best_mlp" / "search_lr"


def test_the_learning_rate_grid_in_the_docs_is_its_committed_trials():
    """docs/best-mlp.md's η × λ table: each row is a committed trial of
    configs/search_best_mlp_lr.toml (its base options with the trial's η, λ and seed,
    trained the full 50 epochs), and its numbers are that trial's summary."""
    from klayer.search.space import load_search

    spec = load_search(REPO_ROOT / "configs" / "search_best_mlp_lr.toml")
    page = (REPO_ROOT / "docs" / "best-mlp.md").read_text()
    trials = sorted(SEARCH_LR.glob("search-*"))
    assert len(trials) == 4
    grid = set()
    for trial in trials:
        run = TrainConfig.from_toml(trial / "config.toml")
        grid.add((run.eta_max, run.lam))
        assert run.config_hash() == spec.base.replace(
            eta_max=run.eta_max, lam=run.lam, seed=run.seed, data_seed=spec.seed,
            out=run.out).config_hash(), trial.name
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["steps"] == spec.base.total_steps
        f = summary["final"]
        row = (f"| {run.eta_max:g} | {run.lam:.3g}".replace("0.0005", "5e-4")
               .replace("0.00125", "1.25e-3"))
        cells = [f"{100 * f[k]:.2f}%" for k in ("val_accuracy", "test_accuracy",
                                                 "train_accuracy")]
        line = next(l for l in page.splitlines() if l.startswith(row + " |"))
        assert [c.strip(" *") for c in line.split("|")[3:6]] == cells, line
    space = {d.name: d.values() for d in spec.space}
    assert grid == {(e, l) for e in space["eta_max"] for l in space["lam"]}
