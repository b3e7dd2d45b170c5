"""Figures with Matplotlib's Agg backend (files only, no display needed).

Training curves (train against validation, against the update step, like the seed
report's figures) and a confusion matrix. Every function writes a PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

CURVES = {"loss": "loss (cross-entropy)", "cost": "cost (loss + λ Σ‖W‖²)",
          "accuracy": "accuracy"}
HISTORY_FIGURE = "curves.png"


def draw_curves(ax, history: list[dict], quantity: str, label: str = "", color=None) -> None:
    """Plot ``train_<quantity>`` (solid) and ``val_<quantity>`` (dashed) against the
    update step on ``ax``; ``label`` prefixes the legend entries (to overlay runs)."""
    steps = [row["step"] for row in history]
    for split, name, style in (("train", "training", "-"), ("val", "validation", "--")):
        ax.plot(steps, [row[f"{split}_{quantity}"] for row in history], style, marker=".",
                color=color, label=f"{label}{name}")
    ax.set_xlabel("update step")
    ax.set_ylabel(CURVES.get(quantity, quantity))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_comparison(histories: dict, path, title: str | None = None) -> Path:
    """Loss, cost and accuracy side by side for runs ``{label: history}``: one colour
    per run (training solid, validation dashed), or two colours for a single run."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(15, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, quantity in zip(axes, CURVES):
        if len(histories) == 1:  # one run: training and validation in two colours
            draw_curves(ax, next(iter(histories.values())), quantity)
        for i, (label, history) in enumerate(histories.items() if len(histories) > 1 else ()):
            draw_curves(ax, history, quantity, f"{label}, ", colors[i % len(colors)])
        ax.set_title(CURVES[quantity])
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def plot_validation(histories: dict, path, title: str | None = None) -> Path:
    """Validation accuracy against the epoch for many runs ``{label: history}`` on one
    axis, the legend beside it (for comparisons of more runs than plot_comparison can
    show legibly)."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, history) in enumerate(histories.items()):
        ax.plot([row["epoch"] for row in history], [row["val_accuracy"] for row in history],
                "-", marker=".", color=colors[i % len(colors)], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title)
    return _save(fig, Path(path))


def plot_history(history: list[dict], out_dir, title: str | None = None) -> Path:
    """The curves of one run: out_dir/curves.png (see :func:`plot_comparison`)."""
    return plot_comparison({"": history}, Path(out_dir) / HISTORY_FIGURE, title)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """counts[i, j] = number of examples of class i predicted as class j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts


def plot_confusion(counts: np.ndarray, class_names, path, title: str = "Confusion matrix"
                   ) -> Path:
    """The matrix of :func:`confusion_matrix` as a heat map, each row normalised to 1."""
    totals = counts.sum(axis=1, keepdims=True)
    rates = counts / np.maximum(totals, 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(title)
    return _save(fig, Path(path))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
