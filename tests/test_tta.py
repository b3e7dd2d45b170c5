"""Test-time flip averaging: the mean of the two views' probabilities, exactly the plain
prediction for a mirror-symmetric network, different for a random one."""

import numpy as np
import pytest

from klayer.levers.augment import IMAGE_SHAPE, mirror
from klayer.nn.layers import softmax
from klayer.nn.network import Network
from klayer.levers.tta import flip_average_accuracy, flip_average_scores

C, H, W = IMAGE_SHAPE
D = C * H * W


def _net(symmetric=False, seed=0):
    """A batch-norm network on images with moving averages from one batch; with
    ``symmetric``, each first-layer filter equals its own mirror, so f(mirror(x)) = f(x)."""
    net = Network(D, [16], 5, batch_norm=True, seed=seed)
    if symmetric:
        W1 = net.params["W1"]
        net.params["W1"] = (W1 + mirror(W1)) / 2  # rows of W1 are images too
    X = np.random.default_rng(seed + 1).standard_normal((64, D))
    net.update_running_stats(net.forward(X, "train").batch_stats)
    return net


def _images(n, seed=2):
    return np.random.default_rng(seed).standard_normal((n, D))


def test_shape_and_normalisation():
    net, X = _net(), _images(37)
    p = flip_average_scores(net, X, chunk=10)
    assert p.shape == (37, 5) and p.dtype == np.float64
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    assert flip_average_scores(net, X[:0]).shape == (0, 5)


def test_the_mean_of_the_two_views():
    net, X = _net(), _images(20)
    want = (softmax(net.scores(X)) + softmax(net.scores(mirror(X)))) / 2
    np.testing.assert_allclose(flip_average_scores(net, X, chunk=7), want, rtol=1e-12)
    # symmetric in the two views: a mirrored test set gives the same answer
    np.testing.assert_allclose(flip_average_scores(net, mirror(X)), want, rtol=1e-12)


def test_mirror_symmetric_network_agrees_with_plain_prediction():
    net, X = _net(symmetric=True), _images(30)
    np.testing.assert_allclose(net.scores(mirror(X)), net.scores(X), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flip_average_scores(net, X), softmax(net.scores(X)),
                               rtol=1e-10, atol=1e-14)


def test_random_network_differs_from_plain_prediction():
    net, X = _net(), _images(30)
    assert np.abs(flip_average_scores(net, X) - softmax(net.scores(X))).max() > 1e-3


def test_preprocess_is_applied_to_both_views_after_mirroring():
    net = Network(8, [6], 5, batch_norm=False, seed=3)
    P = np.random.default_rng(4).standard_normal((D, 8)) / np.sqrt(D)
    X = _images(12)
    seen = []

    def project(A):
        seen.append(A.copy())
        return A @ P

    p = flip_average_scores(net, X, preprocess=project)
    np.testing.assert_array_equal(seen[0], X)
    np.testing.assert_array_equal(seen[1], mirror(X))
    want = (softmax(net.scores(X @ P)) + softmax(net.scores(mirror(X) @ P))) / 2
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_accuracy_and_checks():
    net, X = _net(), _images(40)
    y = flip_average_scores(net, X).argmax(axis=1)
    assert flip_average_accuracy(net, X, y) == 1.0
    assert flip_average_accuracy(net, X, (y + 1) % 5) == 0.0
    with pytest.raises(ValueError, match="one label per row"):
        flip_average_accuracy(net, X, y[:3])
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):
        flip_average_scores(net, np.zeros((3, 10)))
