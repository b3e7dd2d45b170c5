"""REPORT.md of the batch-norm study: tables, figures and text written from the numbers.

Every sentence that compares runs is computed from the measured values, so the text
never claims more than the numbers show (for instance, "does not learn" is written only
when the run's accuracy stays near chance and its loss near ln 10).
"""

from __future__ import annotations

import math
from pathlib import Path

from klayer.nn import gradcheck as G
from klayer import plots, runs
from klayer.study.sections import StudyResult, config_lines

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
             _initialisation(result, fig_dir)]
    if result.extended is not None:
        parts.append(_extended(result, fig_dir))
    parts.append(_timing(result))
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
        *_population_sentence(r),
        "Regenerate with `klayer reproduce" + (" --quick" if budget.name == "quick" else "")
        + (" --extended" if r.extended is not None else "")
        + f" --out {r.out}`; runs already finished are reused.",
    ]
    return "\n".join(lines)


def _populations(r: StudyResult) -> list[tuple[str, list]]:
    """(description, members' seeds) of every population the study trained: runs whose
    summaries say they were trained in a population, search trials by the population
    column of their rows."""
    found = []
    for bn in (True, False):
        members = [run for run in r.init if run.config.batch_norm == bn
                   and run.summary["timings"].get("population_size", 1) > 1]
        if members:
            found.append((f"the {len(members)} σ runs {'with' if bn else 'without'} batch "
                          "norm", [run.config.seed for run in members]))
    for what, rows in (("coarse λ grid", r.search.rows), ("fine λ search", r.fine.rows)):
        groups: dict = {}
        for row in rows:
            if row.get("population") is not None:
                groups.setdefault(row["population"], []).append(row)
        for members in groups.values():
            bn = {row.get("batch_norm", True) for row in members}
            setting = "" if len(bn) > 1 else f" {'with' if bn.pop() else 'without'} batch norm"
            found.append((f"{len(members)} trials of the {what}{setting}",
                          [row["seed"] for row in members]))
    return found


def _population_sentence(r: StudyResult) -> list[str]:
    """The header's lines on the runs trained together (none when every run was alone)."""
    found = _populations(r)
    if not found:
        return []
    text = ("Trained together as populations, each member a network of its own (its own "
            "initial weights from its own seed) trained in lockstep with the others on one "
            "shared stream of mini-batches, ordered by the members' common data seed "
            "(`data_seed`, recorded in each run's config): "
            + "; ".join(what for what, _ in found) + ". Every other run was trained alone. "
            "A run's mini-batches depend on its data seed alone, so each member saw exactly "
            "the mini-batches it would have seen trained alone with its config.")
    return [text, ""]


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


def _comparison_figure(compared, title, path) -> Path:
    return plots.plot_comparison({run.label: run.history for run in compared}, path, title)


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
        "trial's row, seed, population and run folder: `search/trials.md`, "
        "`search-fine/trials.md`.",
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


def _initialisation(r: StudyResult, fig_dir: Path) -> str:
    """Section v: the initialisation study (σ of the weights, with and without BN)."""
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
    """Seconds and update steps per section. Sections ii to v share the workers (see
    :func:`klayer.study.sections.run_study`): their seconds are worker seconds, and the wall-clock
    time of the four together is a row of its own."""
    shared = ("runs", "search")  # worker seconds
    total = sum(secs for key, secs in r.seconds.items() if key not in shared) + r.wall
    all_runs = [*r.depth3, *r.depth9, *r.init, r.final]
    if r.extended is not None:
        all_runs += [run for rs in r.extended.techniques.values() for run in rs]
    reused = sum(run.reused for run in all_runs)
    lines = ["## Time", "",
             "Seconds: wall-clock time, except for sections ii to v, which share "
             f"{r.workers} worker process(es): the λ search and its final run first, the "
             "other runs on the workers they leave free. Their seconds are worker seconds, "
             "the sum of their jobs' times (a job trains one run or one population on one "
             "worker); the row below them is the wall-clock time of the four together. "
             "Update steps: of networks trained alone, and of populations (all their "
             "members at once; in brackets, the networks' steps they stand for).", "",
             "| section | seconds | steps alone | population steps |", "|---|---|---|---|"]
    names = {"gradcheck": "i) gradient checks", "runs": "ii, iii, v) training runs",
             "search": "iv) λ search and final run", "extended": "vi) beyond the study"}
    steps = _steps(r)
    for key, secs in r.seconds.items():
        alone, together, networks = steps.get(key, (0, 0, 0))
        pop = f"{together:,} ({networks:,})" if together else "0"
        lines.append(f"| {names.get(key, key)} | {secs:.1f} | {alone:,} | {pop} |")
        if key == "search":
            lines.append(f"| ii to v) wall clock, on {r.workers} worker(s) | {r.wall:.1f} | | |")
    lines.append(f"| **total (wall clock)** | **{total:.1f}** | | |")
    if reused:
        lines += ["", f"{reused} finished run(s) were reused from an earlier invocation; their "
                      "time is not included."]
    return "\n".join(lines)


def _steps(r: StudyResult) -> dict:
    """{section: (steps of runs alone, steps of populations, network steps of those
    populations)}, counted from the runs and the search rows."""
    def of_runs(study_runs):
        alone = together = networks = 0
        populations: dict = {}
        for run in study_runs:
            size = run.summary["timings"].get("population_size", 1)
            if size > 1:
                populations.setdefault((run.config.batch_norm, run.config.total_steps),
                                       []).append(run)
            else:
                alone += run.config.total_steps
        for (_, total), members in populations.items():
            together += total
            networks += total * len(members)
        return alone, together, networks

    def of_rows(rows, total):
        trained = [row for row in rows if row["state"] in ("COMPLETE", "FAIL")
                   and row.get("seed") is not None]
        groups = {row["population"] for row in trained if row.get("population") is not None}
        in_groups = sum(row.get("population") is not None for row in trained)
        return ((len(trained) - in_groups) * total, len(groups) * total, in_groups * total)

    search_total = 2 * 2 * r.budget.n_s_search  # 2 cycles of 2 n_s steps
    coarse, fine = of_rows(r.search.rows, search_total), of_rows(r.fine.rows, search_total)
    final = r.final.config.total_steps
    steps = {"runs": of_runs([*r.depth3, *r.depth9, *r.init]),
             "search": (coarse[0] + fine[0] + final, coarse[1] + fine[1], coarse[2] + fine[2])}
    if r.extended is not None:
        steps["extended"] = of_runs([run for rs in r.extended.techniques.values() for run in rs])
    return steps


# --- section vi ----------------------------------------------------------------------------

SEED_NOISE = 0.01  # one point: differences below it are not read as effects (one seed each)


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def _extended(r: StudyResult, fig_dir: Path) -> str:
    e = r.extended
    lines = [
        "## vi) Beyond the study",
        "",
        "Each technique is one change to the baseline of sections ii and iii (batch norm before "
        "the ReLU, cyclical SGD, λ = 0.005, the same seed, budget and data); Δ is the change in "
        "test accuracy against that baseline, in points. One seed per run: differences under "
        f"{100 * SEED_NOISE:.0f} point are not read as effects.",
        "",
        "### Gradient checks of the new layers",
        "",
        f"As in section i (float64, h = {G.DEFAULT_H:g}, CIFAR-10 inputs, λ = {e.lam:g}, "
        f"tolerance {G.DEFAULT_TOL:g}), with the usual centred differences and with "
        "fourth-order ones, (8 (J(θ+h) − J(θ−h)) − (J(θ+2h) − J(θ−2h))) / 12h. The usual "
        "formula's truncation error, h² J⁽³⁾ / 6, is close to the tolerance for some of these "
        "costs (it grows as h²: 100× larger at h = 1e-4), so the fourth-order column is the "
        "one judged. Dropout uses one fixed mask for every cost evaluation. "
        "The weights' seed is the first whose ReLU inputs all stay more than "
        f"{G.KINK_MARGIN:g} from 0 on these inputs: a centred difference across a ReLU kink "
        "measures no derivative, whatever the code.",
        "",
        "| network | hidden | seed | largest relative error, centred | fourth-order "
        "| largest absolute error (BN-fed biases) | passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in e.gradcheck:
        absolute = "—" if case.worst_absolute is None else f"{case.worst_absolute:.1e}"
        lines.append(f"| {case.title} | {list(case.hidden)} | {case.seed} | "
                     f"{case.worst_relative_order2:.2e} | {case.worst_relative:.2e} | "
                     f"{absolute} | {'yes' if case.passed else '**NO**'} |")
    worst = max(case.worst_relative for case in e.gradcheck)
    lines += ["", ("**All pass**" if all(c.passed for c in e.gradcheck) else "**Some FAIL**")
              + f"; largest relative error (fourth-order) {worst:.2e}."]

    depths = list(e.techniques)
    lines += ["", "### Techniques", "",
              "| change to the baseline | " + " | ".join(f"{d} test accuracy | Δ" for d in depths)
              + " |", "|---|" + "---|---|" * len(depths)]
    baselines = {d: e.baselines[d][0] for d in depths}
    cells = [f"{pct(baselines[d].test_accuracy)} | " for d in depths]
    lines.append("| none (baseline: batch norm before the ReLU, cyclical SGD) | "
                 + " | ".join(c + "—" for c in cells) + " |")
    rows = [("no normalization (section ii/iii)", {d: e.baselines[d][1] for d in depths})]
    for i, run in enumerate(e.techniques[depths[0]]):  # the same techniques at every depth
        rows.append((run.label, {d: e.techniques[d][i] for d in depths}))
    for label, by_depth in rows:
        cells = [f"{pct(by_depth[d].test_accuracy)} | "
                 f"{_signed(by_depth[d].test_accuracy - baselines[d].test_accuracy)}"
                 for d in depths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", _technique_verdict(rows, baselines, depths)]
    for d in depths:
        compared = [baselines[d], *e.techniques[d]]
        fig = plots.plot_validation({run.label if run is not baselines[d] else "baseline":
                                     run.history for run in compared},
                                    fig_dir / f"extended_{d}.png", f"{d} network: techniques")
        lines += ["", f"![{d} techniques]({_rel(fig, r.out)})"]

    lines += ["", "### Moving averages, PreciseBN and adaptive BN", "",
              f"Test accuracy of every batch-norm run above with three sets of batch-norm "
              f"statistics: the moving averages training kept (α = 0.9); PreciseBN, the "
              f"statistics averaged over {e.precise_batches} training batches run through the "
              f"final weights; adaptive BN, the statistics of the test images themselves "
              f"(**transductive**: it looks at the test inputs, never their labels; not "
              f"comparable with the other columns as a result on unseen data).", "",
              "| run | moving averages | PreciseBN | Δ | adaptive BN (transductive) |",
              "|---|---|---|---|---|"]
    for ev in e.bn_evaluations:
        name = ev.run.label if ev.run.name.startswith("ext") else "baseline"
        depth = f"{len(ev.run.config.hidden_sizes) + 1}-layer"
        lines.append(f"| {depth}: {name} | {pct(ev.moving_average)} | {pct(ev.precise)} | "
                     f"{_signed(ev.precise - ev.moving_average)} | {pct(ev.adaptive)} |")
    if e.bn_evaluations:
        diffs = [ev.precise - ev.moving_average for ev in e.bn_evaluations]
        better = sum(d > 0 for d in diffs)
        lines += ["", f"PreciseBN against the moving averages: mean change "
                      f"{_signed(sum(diffs) / len(diffs))} points over {len(diffs)} runs, higher "
                      f"in {better}, largest change {_signed(max(diffs, key=abs))}."
                      + (" The moving averages are already close to the population statistics "
                         "here: with α = 0.9 and a learning rate that ends near η_min, the last "
                         "batches are normalised by nearly the final weights."
                         if max(map(abs, diffs)) < SEED_NOISE else "")]
    return "\n".join(lines)


def _technique_verdict(rows, baselines, depths) -> str:
    sentences = []
    for d in depths:
        changes = [(label, by_depth[d].test_accuracy - baselines[d].test_accuracy)
                   for label, by_depth in rows]
        helped = [f"{label} ({_signed(c)})" for label, c in changes if c >= SEED_NOISE]
        hurt = [f"{label} ({_signed(c)})" for label, c in changes if c <= -SEED_NOISE]
        text = f"On the {d} network, "
        text += ("one point or more better than the baseline: " + "; ".join(helped)
                 if helped else "nothing beats the baseline by a point or more")
        text += (". One point or more worse: " + "; ".join(hurt) + "." if hurt
                 else ". Nothing is a point or more worse.")
        sentences.append(text)
    return " ".join(sentences)
