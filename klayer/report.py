"""REPORT.md of the batch-norm study: tables, figures and text written from the numbers.

Every sentence that compares runs is computed from the measured values, so the text
never claims more than the numbers show (for instance, "does not learn" is written only
when the run's accuracy stays near chance and its loss near ln 10).
"""

from __future__ import annotations

import math
from pathlib import Path

from klayer import gradcheck as G
from klayer import plots, runs
from klayer.study import StudyResult, config_lines

CHANCE_LOSS = math.log(10)


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def learns(run) -> bool:
    """Clearly above chance: final validation accuracy above 15%."""
    return run.summary["final"]["val_accuracy"] > 0.15


def stuck_at_chance(run) -> bool:
    """Accuracy near 10% and training loss still within 0.05 of ln 10 at the end."""
    f = run.summary["final"]
    return f["test_accuracy"] < 0.15 and abs(f["train_loss"] - CHANCE_LOSS) < 0.05


def write_report(result: StudyResult) -> Path:
    """Write REPORT.md and its figures into result.out; returns the report's path."""
    out = result.out
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    parts = [_header(result), _gradcheck(result), _depth(result, "ii", result.depth3, fig_dir),
             _depth(result, "iii", result.depth9, fig_dir), _search(result, fig_dir),
             _init(result, fig_dir), _timing(result)]
    path = out / "REPORT.md"
    runs.write_text(path, "\n\n".join(parts) + "\n")
    return path


def _rel(path: Path, out: Path) -> str:
    return Path(path).resolve().relative_to(out.resolve()).as_posix()


def _header(r: StudyResult) -> str:
    budget = r.budget
    data = ("all 45,000 training images for training, the last 5,000 images of the five "
            "training batches for validation and the 10,000 test images for test"
            if budget.subset is None else
            f"the first {budget.subset:,} images of each split (training: the five training "
            "batches but their last 5,000 images, which are the validation split; test: the "
            "test batch)")
    lines = [
        "# The batch-norm study, reproduced by klayer",
        "",
        f"Budget: **{budget.name}**. Data: CIFAR-10, {data}; inputs "
        "scaled to [0, 1] and standardised with the training split's mean and std. "
        "Mini-batches of 100, cyclical learning rate η ∈ [1e-5, 1e-1]. Every run is one seed; "
        "its configuration, history, model and curves are in `runs/<name>-<hash>/`.",
        "",
        "Regenerate with `klayer reproduce" + (" --quick" if budget.name == "quick" else "")
        + f" --out {r.out}`; runs already finished are reused.",
    ]
    return "\n".join(lines)


def _gradcheck(r: StudyResult) -> str:
    b = r.budget
    parts = [
        "## i) Gradient verification",
        "",
        f"Analytic gradients against centred differences (h = {G.DEFAULT_H:g}, float64, batch "
        f"norm in train mode) on the first {b.gradcheck_samples} CIFAR-10 training images, "
        f"first {b.gradcheck_dims} standardised dimensions, λ = {r.gradcheck_lam:g}. Error per "
        f"tensor: max |ga − gn| / max({G.DEFAULT_FLOOR:g}, |ga| + |gn|); tolerance "
        f"{G.DEFAULT_TOL:g}. Biases feeding batch norm (true gradient 0): absolute error, "
        f"tolerance {G.DEFAULT_ABS_TOL:g}.",
    ]
    worst = max(row.error for t in r.gradcheck for row in t.rows if row.kind == "relative")
    worst_abs = max((row.error for t in r.gradcheck for row in t.rows if row.kind == "absolute"),
                    default=0.0)
    for table in r.gradcheck:
        parts += ["", G.markdown_table(table.rows, table.title)]
    all_passed = all(t.passed for t in r.gradcheck)
    parts += ["", ("**All checks pass.** " if all_passed else "**Some checks FAIL.** ")
              + f"Largest relative error: {worst:.2e}; largest absolute error of a bias feeding "
              f"batch norm: {worst_abs:.2e}."]
    return "\n".join(parts)


def _comparison_figure(runs_, title, path) -> Path:
    return plots.plot_comparison({run.label: run.history for run in runs_}, path, title)


def _depth(r: StudyResult, numeral: str, pair, fig_dir: Path) -> str:
    bn, nobn = pair
    k = len(bn.config.hidden_sizes) + 1
    fig = _comparison_figure(pair, f"{k}-layer network, hidden {list(bn.config.hidden_sizes)}",
                             fig_dir / f"{k}layer.png")
    diff = bn.test_accuracy - nobn.test_accuracy
    if abs(diff) < 0.005:
        verdict = (f"With batch norm and without, the {k}-layer network ends within "
                   f"{100 * abs(diff):.2f} points of each other: no difference this study can "
                   "distinguish with one seed.")
    else:
        better = "with" if diff > 0 else "without"
        verdict = (f"The {k}-layer network {better} batch norm reaches the higher test "
                   f"accuracy, by {100 * abs(diff):.2f} points (one seed each).")
    lines = [
        f"## {numeral}) {k}-layer network",
        "",
        "```toml", config_lines(bn.config, ["hidden_sizes", "init", "lam", "eta_min", "eta_max",
                                            "n_s", "cycles", "batch_size", "dtype", "seed"]),
        "```",
        "",
        f"![{k}-layer curves]({_rel(fig, r.out)})",
        "",
        "| network | test accuracy | validation accuracy | final train loss | time (s) |",
        "|---|---|---|---|---|",
    ]
    for run in pair:
        f = run.summary["final"]
        lines.append(f"| {run.label} | {pct(f['test_accuracy'])} | {pct(f['val_accuracy'])} | "
                     f"{f['train_loss']:.3f} | {run.summary['timings']['total_seconds']:.1f} |")
    lines += ["", verdict]
    return "\n".join(lines)


def _search(r: StudyResult, fig_dir: Path) -> str:
    coarse, fine = r.search.rows, r.fine.rows
    lines = [
        "## iv) λ search",
        "",
        "Coarse: λ = 10^l for 8 values of l evenly spaced in [−5, −1], with and without batch "
        f"norm, 2 cycles, n_s = {r.budget.n_s_search}; objective: validation accuracy of the "
        "final network. Then a random search with batch norm, log-uniform within one grid step "
        "of the best coarse λ with batch norm, then a final run with the best λ found. Every "
        "trial's row, seed and run folder: `search/trials.md`, `search-fine/trials.md`.",
        "",
        "| λ | validation accuracy, no BN | validation accuracy, BN |",
        "|---|---|---|",
    ]
    table: dict = {}
    for row in coarse:
        table.setdefault(row["lam"], {})[row["batch_norm"]] = row
    for lam in sorted(table):
        cells = []
        for bn in (False, True):
            row = table[lam].get(bn)
            cells.append(pct(row["val_accuracy"]) if row and row["state"] == "COMPLETE"
                         else "failed")
        lines.append(f"| {lam:.2e} | {cells[0]} | {cells[1]} |")
    for bn in (True, False):
        done = [row for row in coarse if row["batch_norm"] == bn and row["state"] == "COMPLETE"]
        if done:
            best = max(done, key=lambda row: row["val_accuracy"])
            lines += ["", f"Best coarse λ {'with' if bn else 'without'} batch norm: "
                          f"{best['lam']:.2e} ({pct(best['val_accuracy'])} validation)."]
    figure = r.search.out / "lambda_search.png"
    if figure.exists():
        lines += ["", f"![validation accuracy against λ]({_rel(figure, r.out)})"]
    if fine:
        lines += ["", "Fine search (batch norm; random λ around the best coarse λ with batch norm):",
                  "",
                  "| λ | validation accuracy |", "|---|---|"]
        for row in sorted(fine, key=lambda row: row["lam"]):
            value = pct(row["val_accuracy"]) if row["state"] == "COMPLETE" else "failed"
            lines.append(f"| {row['lam']:.3e} | {value} |")
    final = r.final
    fig = _comparison_figure([final], "final run with the best λ", fig_dir / "final.png")
    f = final.summary["final"]
    lines += [
        "",
        f"Final run: λ = {final.config.lam:.3e}, batch norm {final.config.batch_norm}, "
        f"{final.config.cycles} cycles with n_s = {final.config.n_s}: **test accuracy "
        f"{pct(f['test_accuracy'])}** (validation {pct(f['val_accuracy'])}).",
        "",
        f"![final run]({_rel(fig, r.out)})",
    ]
    return "\n".join(lines)


def _init(r: StudyResult, fig_dir: Path) -> str:
    lines = [
        "## v) Initialisation sensitivity",
        "",
        "3-layer network [50, 50], weights N(0, σ²), 2 cycles with "
        f"n_s = {r.budget.n_s_search}, λ = {r.init[0].config.lam:g}.",
        "",
        "| σ | test accuracy, no BN | test accuracy, BN | final train loss, no BN | "
        "final train loss, BN |",
        "|---|---|---|---|---|",
    ]
    by_sigma: dict = {}
    for run in r.init:
        by_sigma.setdefault(run.config.init, {})[run.config.batch_norm] = run
    sentences, figures = [], []
    for sigma in sorted(by_sigma, reverse=True):
        pair = by_sigma[sigma]
        nobn, bn = pair[False], pair[True]
        lines.append(f"| {sigma:g} | {pct(nobn.test_accuracy)} | {pct(bn.test_accuracy)} | "
                     f"{nobn.summary['final']['train_loss']:.3f} | "
                     f"{bn.summary['final']['train_loss']:.3f} |")
        fig = _comparison_figure([bn, nobn], f"σ = {sigma:g}", fig_dir / f"sigma_{sigma:g}.png")
        figures.append(f"![σ = {sigma:g}]({_rel(fig, r.out)})")
        if stuck_at_chance(nobn) and learns(bn):
            sentences.append(f"At σ = {sigma:g} the network without batch norm does not learn "
                             f"(test accuracy {pct(nobn.test_accuracy)}, training loss "
                             f"{nobn.summary['final']['train_loss']:.3f} ≈ ln 10), while "
                             f"with batch norm it reaches {pct(bn.test_accuracy)}.")
        elif learns(bn) and learns(nobn):
            sentences.append(f"At σ = {sigma:g} both learn: {pct(bn.test_accuracy)} with batch "
                             f"norm, {pct(nobn.test_accuracy)} without.")
        else:
            sentences.append(f"At σ = {sigma:g}: {pct(bn.test_accuracy)} with batch norm, "
                             f"{pct(nobn.test_accuracy)} without.")
    lines += ["", *(" ".join(sentences).split("\n")), "", *figures]
    return "\n".join(lines)


def _timing(r: StudyResult) -> str:
    total = sum(r.seconds.values())
    reused = sum(run.reused for run in [*r.depth3, *r.depth9, *r.init, r.final])
    lines = ["## Time", "", "| section | seconds |", "|---|---|"]
    names = {"gradcheck": "i) gradient checks", "runs": "ii, iii, v) training runs",
             "search": "iv) λ search and final run"}
    for key, secs in r.seconds.items():
        lines.append(f"| {names.get(key, key)} | {secs:.1f} |")
    lines.append(f"| **total** | **{total:.1f}** |")
    if reused:
        lines += ["", f"{reused} finished run(s) were reused from an earlier invocation; their "
                      "time is not included."]
    return "\n".join(lines)
