"""``klayer evaluate RUN``: test accuracy, per-class accuracy and a confusion matrix.

The saved model is applied to the CIFAR-10 test batch standardised with the model's own
statistics (those of its training set), so the result does not depend on how the data
would be split today.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="test accuracy of a trained run",
        description="Print the test accuracy and the accuracy of each class of a trained "
                    "run, and draw its confusion matrix.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or its model.npz)")
    p.add_argument("--data-dir", metavar="DIR", help="where CIFAR-10 is (default: the run's, "
                                                     "else $KLAYER_DATA)")
    p.add_argument("--out", type=Path, metavar="PNG",
                   help="confusion matrix image (default RUN/confusion.png)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from klayer import data as D
    from klayer import runs

    net, standardizer, class_names = runs.load_model(args.run)
    if standardizer is None:
        raise ValueError(f"{args.run} has no normalisation statistics: it was not trained "
                         "on CIFAR-10 by `klayer train`, so it cannot be evaluated on it")
    class_names = list(class_names or D.CLASS_NAMES)
    run_dir = args.run if args.run.is_dir() else args.run.parent
    data_dir = args.data_dir
    if data_dir is None and (run_dir / runs.CONFIG_FILE).exists():
        data_dir = runs.read_config(run_dir).data_dir
    files = D.batch_files(D.ensure_cifar10(data_dir, download=True, progress=False))
    X_pixels, y = D.read_batch(files[D.TEST_BATCH])
    X = standardizer.transform(X_pixels, net.dtype)

    from klayer import plots  # after the checks: importing Matplotlib takes a moment

    predicted = net.predict(X)
    counts = plots.confusion_matrix(y, predicted, net.num_classes)
    per_class = np.diag(counts) / np.maximum(counts.sum(axis=1), 1)
    print(f"test accuracy {np.mean(predicted == y):.2%} on {len(y)} images "
          f"(loss {net.evaluate(X, y)['loss']:.4f})")
    width = max(map(len, class_names))
    for name, acc, total in zip(class_names, per_class, counts.sum(axis=1)):
        print(f"  {name:<{width}}  {acc:.2%}  ({total} images)")
    out = args.out or run_dir / "confusion.png"
    plots.plot_confusion(counts, class_names, out, title=f"Confusion matrix: {run_dir.name}")
    print(f"confusion matrix: {out}")
    return 0
