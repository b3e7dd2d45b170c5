"""MODEL.md: a model card written from a run folder's own files.

What the model is (architecture), what it was trained on and how (splits, subset,
standardisation, optimisation), how well it does (the run's final numbers; the test
accuracy per class when ``klayer evaluate`` measured it) and where it stops working
(known limits). :func:`model_card` turns those numbers into Markdown and does no I/O;
:func:`write_model_card` reads the run's files and writes RUN/MODEL.md.

``klayer evaluate RUN`` writes it with the per-class accuracies it measured on the full
test batch; ``klayer export RUN`` writes it from the run's files when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from klayer import runs
from klayer.levers import augment

CARD_FILE = "MODEL.md"
CONFUSION_FILE = "confusion.png"
CURVES_FILE = "curves.png"


def model_card(name: str, architecture: dict, config=None, summary: dict | None = None,
               history: list | None = None, evaluation: dict | None = None,
               class_names=None, figures=()) -> str:
    """The Markdown of a model card.

    architecture: ``Network.hyperparameters()``; config: the run's TrainConfig (None for a
    model without its run folder); summary: summary.json; history: history.csv rows;
    evaluation: ``{"accuracy", "loss", "images", "per_class": [(accuracy, images)...],
    "statistics"}`` from ``klayer evaluate`` (None: not measured); figures: the file
    names present among confusion.png and curves.png.
    """
    a = architecture
    sizes = [a["input_size"], *a["hidden_sizes"], a["num_classes"]]
    names = list(class_names or range(a["num_classes"]))
    lines = [f"# Model card: {name}", ""]
    version = (summary or {}).get("klayer_version")
    lines += [f"A {len(sizes) - 1}-layer fully-connected network trained by klayer"
              f"{' ' + version if version else ''} on CIFAR-10.", ""]
    if summary and summary.get("config_hash"):
        lines += [f"Config hash `{summary['config_hash']}` (`config.toml` holds every "
                  "option).", ""]

    lines += ["## Architecture", "", f"- widths {' → '.join(map(str, sizes))} "
              f"({_parameter_count(sizes, a):,} parameters), ReLU hidden units, softmax output"]
    norm = ("batch norm" if a["batch_norm"] else "layer norm" if a["layer_norm"] else None)
    if norm:
        lines.append(f"- {norm} {a['norm_position']} each hidden ReLU (ε = {a['bn_eps']:g}"
                     + (f", moving-average factor α = {a['bn_alpha']:g})" if a["batch_norm"]
                        else ")"))
    else:
        lines.append("- no normalization")
    if a.get("residual"):
        lines.append("- residual connections on hidden layers that keep their width")
    if a.get("dropout"):
        lines.append(f"- dropout p = {a['dropout']:g} on hidden outputs during training")
    if a.get("label_smoothing"):
        lines.append(f"- label smoothing ε = {a['label_smoothing']:g}")
    lines += [f"- initialisation {a['init']}, seed {a['seed']}, {a['dtype']} arithmetic", ""]

    lines += ["## Training data and protocol", ""]
    if config is None:
        lines += ["The run's config.toml is missing: the training data and protocol are "
                  "unknown.", ""]
    else:
        lines += [f"- CIFAR-10, {_protocol(config)}"]
        if config.subset is not None:
            lines.append(f"- subset: only the first {config.subset} images of each split "
                         "(train, validation and the run's own test numbers)")
        lines.append("- inputs standardised per dimension, (x / 255 - μ) / σ, with μ, σ of "
                     "the training images (stored in model.json)")
        lines.append(f"- {config.optimizer} on mini-batches of {config.batch_size}, "
                     f"{_schedule(config)}, {config.total_steps} steps, λ = {config.lam:g} "
                     "(L2 on the weights)")
        lines.append(f"- augmentation: {augment.describe(config)}")
        if config.precise_bn:
            lines.append(f"- batch-norm statistics recomputed after training over "
                         f"{config.precise_bn} training batches (PreciseBN)")
        lines.append("")

    lines += ["## Results", ""]
    final = (summary or {}).get("final")
    if final:
        lines += ["Final network, from summary.json:", "", "| split | accuracy | loss |",
                  "|---|---|---|"]
        for split in ("train", "val", "test"):
            if f"{split}_accuracy" in final:
                lines.append(f"| {split} | {final[f'{split}_accuracy']:.2%} | "
                             f"{final[f'{split}_loss']:.4f} |")
        lines.append("")
        if "best_val_accuracy" in summary:
            lines += [f"Best validation accuracy {summary['best_val_accuracy']:.2%} at step "
                      f"{summary['best_step']} of {summary['steps']} "
                      f"({summary['epochs']:.1f} epochs).", ""]
    if history:
        lines += [f"history.csv: {len(history)} evaluation points"
                  + (f"; learning curves in [{CURVES_FILE}]({CURVES_FILE})."
                     if CURVES_FILE in figures else "."), ""]
    if evaluation:
        lines += [f"Test accuracy on the {evaluation['images']} images of the CIFAR-10 test "
                  f"batch, measured by `klayer evaluate`: **{evaluation['accuracy']:.2%}** "
                  f"(loss {evaluation['loss']:.4f}), with {evaluation['statistics']}.", "",
                  "| class | accuracy | images |", "|---|---|---|"]
        for cls, (acc, count) in zip(names, evaluation["per_class"]):
            lines.append(f"| {cls} | {acc:.2%} | {count} |")
        lines.append("")
    else:
        lines += ["Per-class test accuracy: not measured yet; `klayer evaluate RUN` "
                  "measures it and rewrites this card.", ""]
    if CONFUSION_FILE in figures:
        lines += [f"![Confusion matrix]({CONFUSION_FILE})", ""]

    lines += ["## Known limits", "",
              "- Inputs are 32×32 RGB images, pixels 0..255; other sizes must be resized "
              "first, and grayscale images are not supported.",
              f"- It knows only CIFAR-10's {len(names)} classes ({', '.join(map(str, names))}); "
              "every image gets one of them, with no \"none of these\".",
              "- A fully-connected network sees pixels, not shapes: shifted, rotated or "
              "re-coloured images, and photos unlike CIFAR-10's, are classified less well.",
              "- The test accuracy is that of the evaluation mode: "
              + ("batch norm uses the statistics saved with the model (moving averages"
                 + (", or PreciseBN" if config is not None and config.precise_bn else "")
                 + "), not those of the batch at hand; dropout is off."
                 if a["batch_norm"] else "no batch statistics are involved; dropout is off."),
              ""]
    return "\n".join(lines)


def write_model_card(run_dir, network, class_names=None, evaluation=None) -> Path:
    """Write RUN/MODEL.md from the run's files (see :func:`model_card`); returns its path."""
    run_dir = Path(run_dir)
    config = (runs.read_config(run_dir) if (run_dir / runs.CONFIG_FILE).exists() else None)
    summary = (runs.read_summary(run_dir) if (run_dir / runs.SUMMARY_FILE).exists() else None)
    history = (runs.read_history(run_dir / runs.HISTORY_FILE)
               if (run_dir / runs.HISTORY_FILE).exists() else None)
    figures = [f for f in (CONFUSION_FILE, CURVES_FILE) if (run_dir / f).exists()]
    text = model_card(run_dir.name, network.hyperparameters(), config, summary, history,
                      evaluation, class_names, figures)
    path = run_dir / CARD_FILE
    runs.write_text(path, text)
    return path


def _parameter_count(sizes, a) -> int:
    weights = sum((d + 1) * m for d, m in zip(sizes, sizes[1:]))
    norm = a["batch_norm"] or a["layer_norm"]
    return weights + (2 * sum(sizes[1:-1]) if norm else 0)


def _protocol(config) -> str:
    cap = config.subset or 50000
    if config.protocol == "single":
        split = "training batch 1, validation batch 2"
        n_train = n_val = min(10000, cap)
    else:
        split = (f"training batches 1-5 less their last {config.n_val} images, which "
                 "validate")
        n_train, n_val = min(50000 - config.n_val, cap), min(config.n_val, cap)
    return (f"protocol \"{config.protocol}\": {split} ({n_train:,} training and {n_val:,} "
            "validation images), test batch for testing")


def _schedule(config) -> str:
    if config.schedule == "cyclic":
        return (f"cyclic learning rate {config.eta_min:g}..{config.eta_max:g} "
                f"(n_s = {config.n_s}, {config.cycles} cycle{'s' if config.cycles > 1 else ''})")
    if config.schedule == "constant":
        return f"constant learning rate {config.eta_max:g}"
    return f"{config.schedule} learning rate from {config.eta_max:g}"
