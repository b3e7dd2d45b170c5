"""``klayer evaluate RUN``: test accuracy, per-class accuracy and a confusion matrix.

The saved model is applied to the run's own test split: the data options of its
config.toml (protocol, n_val, subset) go through :func:`klayer.data.load_data`, as in
training, so the accuracy is the one summary.json reports. The training statistics found
now must match the model's (else the data is not the one it was trained on). A model
file without its config.toml is evaluated on the whole test batch.

Batch-norm statistics: by default the moving averages saved with the model. With
``--precise-bn N`` they are recomputed over N training batches (PreciseBN); with
``--adaptive-bn`` over the test images themselves (adaptive BN: transductive, and printed
as such). Both are reported beside the moving averages; the model file is not changed.
With ``--tta``, the accuracy with test-time flip averaging (the mean of the softmax of
each image and of its mirror, :mod:`klayer.levers.tta`) is printed on a line of its own,
after the plain accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from klayer.nn.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="test accuracy of a trained run",
        description="Print the test accuracy and the accuracy of each class of a trained "
                    "run, and draw its confusion matrix.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or its model.npz)")
    p.add_argument("--data-dir", metavar="DIR", help="where CIFAR-10 is (default: the run's, "
                                                     "else $KLAYER_DATA, else the user cache)")
    p.add_argument("--precise-bn", type=int, metavar="BATCHES",
                   help="also evaluate with batch-norm statistics recomputed over BATCHES "
                        "training batches of the run's batch size (PreciseBN)")
    p.add_argument("--adaptive-bn", action="store_true",
                   help="also evaluate with batch-norm statistics of the test images "
                        "(adaptive BN; transductive: uses the test inputs, not their labels)")
    p.add_argument("--tta", action="store_true",
                   help="also print the test accuracy with test-time flip averaging (the "
                        "mean prediction of each image and its mirror)")
    p.add_argument("--out", type=Path, metavar="PNG",
                   help="confusion matrix image (default RUN/confusion.png)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import klayer
    from klayer import data as D
    from klayer import runs

    model = klayer.load_model(args.run)
    net, standardizer, class_names = model.network, model.standardizer, model.class_names
    run_dir = args.run if args.run.is_dir() else args.run.parent
    # the run's configuration, when evaluating a run folder (not a copied model file)
    config = runs.read_config(run_dir) if (run_dir / runs.CONFIG_FILE).exists() else None
    if config is not None and args.data_dir is not None:
        config = config.replace(data_dir=str(args.data_dir))
    dataset, X, y, split = _test_split(net, standardizer, config, args.data_dir)
    if args.tta and X.shape[1] != 3072:
        raise UserError(f"--tta averages over mirrored CIFAR-10 images (3072 values), but "
                        f"this model takes {X.shape[1]}; leave --tta out")
    class_names = list(class_names or D.CLASS_NAMES)
    print(f"test split: {split}")

    from klayer import plots  # after the checks: importing Matplotlib takes a moment

    if args.precise_bn is not None or args.adaptive_bn:
        _other_statistics(args, net, X, y, config, run_dir, dataset)

    predicted = net.predict(X)
    counts = plots.confusion_matrix(y, predicted, net.num_classes)
    per_class = np.diag(counts) / np.maximum(counts.sum(axis=1), 1)
    print(f"test accuracy {np.mean(predicted == y):.2%} on {len(y)} images "
          f"(loss {net.evaluate(X, y)['loss']:.4f})"
          + (f" with {_saved_statistics(config)}" if net.batch_norm else ""))
    width = max(map(len, class_names))
    for name, acc, total in zip(class_names, per_class, counts.sum(axis=1)):
        print(f"  {name:<{width}}  {acc:.2%}  ({total} images)")
    if args.tta:
        from klayer.levers.tta import flip_average_accuracy

        print(f"test accuracy with flip averaging (TTA, two forward passes): "
              f"{flip_average_accuracy(net, X, y):.2%}")
    out = args.out or run_dir / "confusion.png"
    plots.plot_confusion(counts, class_names, out, title=f"Confusion matrix: {run_dir.name}")
    print(f"confusion matrix: {out}")
    if config is not None:  # a run folder: refresh its model card with these numbers
        from klayer.model_card import write_model_card

        statistics = _saved_statistics(config) if net.batch_norm else "no batch norm"
        evaluation = {"accuracy": float(np.mean(predicted == y)), "images": len(y),
                      "loss": net.evaluate(X, y)["loss"], "statistics": statistics,
                      "per_class": list(zip(per_class, counts.sum(axis=1)))}
        print(f"model card: {write_model_card(run_dir, net, class_names, evaluation)}")
    return 0


def _test_split(net, standardizer, config, data_dir):
    """(Dataset or None, X_test, y_test, what they are): the run's own test split when its
    config is known (same protocol, n_val and subset as in training), else the whole
    test batch standardised with the model's statistics."""
    from klayer import data as D
    from klayer import runs

    if config is None:
        files = D.batch_files(D.ensure_cifar10(data_dir, download=True, progress=False))
        X_pixels, y = D.read_batch(files[D.TEST_BATCH])
        return (None, standardizer.transform(X_pixels, net.dtype), y,
                f"{len(y):,} images (the whole test batch: no {runs.CONFIG_FILE} beside the "
                "model says which split it was trained on)")
    dataset = D.load_data(config)
    if not (np.allclose(dataset.standardizer.mean, standardizer.mean)
            and np.allclose(dataset.standardizer.std, standardizer.std)):
        raise UserError("the training images found now are not those the model was "
                        "trained on (their statistics differ); point --data-dir at the "
                        "run's data")
    n = len(dataset.y_test)
    if n < D.IMAGES_PER_BATCH:
        what = f"{n:,} images (subset {config.subset} of the run's config)"
    else:
        what = f"{n:,} images (the whole test batch, as in the run's config)"
    return dataset, dataset.X_test.astype(net.dtype, copy=False), dataset.y_test, what


def _other_statistics(args, net, X, y, config, run_dir, dataset) -> None:
    """Print the test accuracy with PreciseBN and/or adaptive-BN statistics."""
    from klayer.levers.bn_stats import population_statistics, use_statistics

    if not net.batch_norm:
        raise UserError("--precise-bn and --adaptive-bn recompute batch-norm statistics, but "
                        "this network has no batch norm")
    batch = config.batch_size if config else 100
    saved = dict(net.buffers)
    moving = net.evaluate(X, y)["accuracy"]
    print(f"batch-norm statistics (test accuracy): {_saved_statistics(config)} {moving:.2%}")
    if args.precise_bn is not None:
        if config is None:
            raise UserError(f"--precise-bn needs the run's config.toml (in {run_dir}) to know "
                            "its training images; evaluate the run folder, not a copied model")
        X_train = dataset.X_train.astype(net.dtype, copy=False)
        use_statistics(net, population_statistics(net, X_train, batch, args.precise_bn,
                                                  seed=config.seed))
        print(f"  PreciseBN over {args.precise_bn} training batches of {batch}: "
              f"{net.evaluate(X, y)['accuracy']:.2%}")
    if args.adaptive_bn:
        use_statistics(net, population_statistics(net, X, batch, None, seed=0))
        print(f"  adaptive BN, statistics of the {len(X)} test images (transductive): "
              f"{net.evaluate(X, y)['accuracy']:.2%}")
    use_statistics(net, saved)  # the rest of the report uses the saved moving averages


def _saved_statistics(config) -> str:
    """What the model's saved batch-norm statistics are (config: the run's, or None)."""
    if config is not None and config.ema:
        over = config.precise_bn or 50
        return (f"the saved statistics (recomputed for the averaged weights over {over} "
                "batches)")
    if config is not None and config.precise_bn:
        return f"the saved statistics (PreciseBN over {config.precise_bn} batches)"
    return "the saved moving averages"
