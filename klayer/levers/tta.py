"""Test-time augmentation: average the predictions over an image and its mirror.

    p̄(x) = ½ (softmax(f(x)) + softmax(f(mirror(x))))

with f the network in eval mode and mirror the left-right flip that training's
augmentation uses (:func:`klayer.levers.augment.mirror`). Flips are label-preserving for
CIFAR-10, so a network trained with them sees both views as the same class; averaging
the two probability vectors removes part of its error that is not mirror-symmetric.
It costs a second forward pass. Results with it are reported apart from plain accuracy.

When the network takes transformed inputs (whitened rows, :mod:`klayer.levers.whiten`), the
mirror is taken in pixel space and ``preprocess`` maps both views afterwards.
"""

from __future__ import annotations

import numpy as np

from klayer.levers.augment import IMAGE_SHAPE, mirror
from klayer.nn.errors import UserError
from klayer.nn.layers import softmax


def flip_average_scores(net, X, preprocess=None, chunk: int = 2000,
                        image_shape=IMAGE_SHAPE) -> np.ndarray:
    """p̄ for every row of X: (n, C·H·W) standardised images -> (n, num_classes)
    probabilities (rows sum to 1), in eval mode, ``chunk`` rows at a time.

    preprocess: None, or a function applied to each view (e.g. ``whitening.transform``)
    before the network.
    """
    X = np.asarray(X)
    size = int(np.prod(image_shape))
    if X.ndim != 2 or X.shape[1] != size:
        raise UserError(f"flip averaging works on images of shape {tuple(image_shape)}: X "
                        f"must be (n, {size}), got {X.shape}")
    prepare = (lambda A: A) if preprocess is None else preprocess
    parts = []
    for start in range(0, len(X), chunk):
        rows = X[start:start + chunk]
        p = softmax(net.scores(prepare(rows), "eval"))
        p += softmax(net.scores(prepare(mirror(rows, image_shape)), "eval"))
        p *= 0.5
        parts.append(p)
    if not parts:
        return np.zeros((0, net.num_classes), net.dtype)
    return np.concatenate(parts)


def flip_average_accuracy(net, X, y, **options) -> float:
    """Accuracy of argmax p̄ against labels y: (n,)."""
    y = np.asarray(y)
    if y.shape != (len(X),):
        raise UserError(f"y must hold one label per row of X ({len(X)}), got {y.shape}")
    return float(np.mean(flip_average_scores(net, X, **options).argmax(axis=1) == y))
