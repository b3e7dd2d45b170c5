"""The results of a search: one row per trial, trials.csv and trials.md, best.toml and
the λ figure (lambda_search.png)."""

from __future__ import annotations

import csv
from pathlib import Path

from klayer.config import TrainConfig
from klayer.search.space import Round, SearchSpec, trial_config

# a table row: round, trial, state, the searched options, then these
# (population: the number of the first trial of the population it was trained in;
# seconds: that population's time)
RESULT_KEYS = ("seed", "val_accuracy", "val_accuracy_best", "val_accuracy_final", "best_epoch",
               "test_accuracy", "seconds", "population", "run_dir", "fail_reason")


def trial_row(trial, rnd: Round, spec: SearchSpec) -> dict:
    """One trial as a table row: round, number, state, options, seed, numbers, reason."""
    attrs = trial.user_attrs
    row = {"round": rnd.name, "trial": trial.number, "state": trial.state.name}
    for d in rnd.space:
        row[d.name] = d.decode(trial.params[d.name]) if d.name in trial.params else None
    for key in RESULT_KEYS:
        row[key] = trial.value if key == "val_accuracy" else attrs.get(key)
    if "node" in attrs:  # the Ray node that ran it (searches on Ray)
        row["node"] = attrs["node"]
    return row


def best_row(rows: list) -> dict | None:
    """The finished trial with the highest objective (the earliest on a tie)."""
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    return max(complete, key=lambda r: r["val_accuracy"], default=None)


def config_of(row: dict, spec: SearchSpec) -> TrainConfig:
    """The TrainConfig a trial trained (without its run folder)."""
    options = {d.name: row[d.name] for d in spec.space}
    return trial_config(spec.base, options, row["seed"])


def _columns(rows: list) -> list:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def format_cell(key: str, value) -> str:
    """A table cell: accuracies to 4 decimals, times to 0.1 s, options to 3 digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        if key == "batch_norm":
            return "on" if value else "off"
        return str(value).lower()
    if isinstance(value, float):
        if key.startswith(("val_", "test_")):
            return f"{value:.4f}"
        if key in ("seconds", "best_epoch"):
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def markdown_table(rows: list, max_reason: int = 90) -> str:
    """The trials as a Markdown table (failure reasons shortened)."""
    columns = [c for c in _columns(rows) if c != "run_dir"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(c, row.get(c)) for c in columns]
        cells = [c if len(c) <= max_reason else c[:max_reason - 1] + "…" for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list, spec: SearchSpec) -> list[Path]:
    """trials.csv (full values) and trials.md."""
    from klayer.runs import write_text

    columns = _columns(rows)
    csv_path, md_path = out / "trials.csv", out / "trials.md"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                             for k, v in row.items()})
    objective = "final" if spec.objective == "final" else "best over the history points"
    write_text(md_path, f"# Search: {spec.method}, objective = validation accuracy "
                        f"({objective})\n\n" + markdown_table(rows))
    return [csv_path, md_path]


def write_results(out: Path, rows: list, spec: SearchSpec, best: dict | None,
                  best_config: TrainConfig | None) -> list[Path]:
    """best.toml and (when λ is searched) lambda_search.png."""
    from klayer.runs import write_text

    files = []
    if best_config is not None:
        header = (f"# best trial of klayer search: {best['round']} trial {best['trial']}, "
                  f"validation accuracy {best['val_accuracy']:.4f} ({spec.objective})\n")
        write_text(out / "best.toml", header + best_config.to_toml())
        files.append(out / "best.toml")
    if any(r["state"] == "COMPLETE" and r.get("lam") is not None for r in rows):
        files.append(plot_lambda(rows, out / "lambda_search.png", spec))
    return files


def plot_lambda(rows: list, path, spec: SearchSpec) -> Path:
    """Validation accuracy against λ (log axis): a line per batch-norm setting for the
    first round, crosses for the trials of a fine round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [r for r in rows if r["state"] == "COMPLETE" and r.get("lam") is not None]
    for bn, colour in ((True, "tab:blue"), (False, "tab:orange")):
        mine = sorted((r for r in points if r.get("batch_norm", spec.base.batch_norm) == bn),
                      key=lambda r: r["lam"])
        setting = f"batch norm {'on' if bn else 'off'}"
        first = [r for r in mine if r["round"] == "search"]
        fine = [r for r in mine if r["round"] != "search"]
        if first:
            ax.plot([r["lam"] for r in first], [r["val_accuracy"] for r in first], marker="o",
                    color=colour, label=setting)
        if fine:
            ax.plot([r["lam"] for r in fine], [r["val_accuracy"] for r in fine], "x",
                    color=colour, markersize=8, label=f"{setting}, fine round")
    best = best_row(points)
    ax.plot([best["lam"]], [best["val_accuracy"]], "k*", markersize=12,
            label=f"best: λ = {best['lam']:.3g}, {best['val_accuracy']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("λ (L2 penalty)")
    ax.set_ylabel(f"validation accuracy ({spec.objective})")
    ax.set_title("λ search")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
