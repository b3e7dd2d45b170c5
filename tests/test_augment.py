"""Augmentation: flips and translations against a plain per-image loop, jitter as an affine
map per image, seeded draws, input untouched, dtype kept, arguments checked."""

import numpy as np
import pytest

from klayer.augment import IMAGE_SHAPE, Augmentation

C, H, W = IMAGE_SHAPE
D = C * H * W


def _images(n, seed=0, dtype="float64"):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(dtype)


def _reference(X, flip, t, rng):
    """One image at a time: zero-pad by t, crop the H × W window at (dy, dx), maybe mirror.
    Draws as the docstring orders them: (dy, dx) for all images, then the flips."""
    n = len(X)
    dy, dx = rng.integers(0, 2 * t + 1, size=(2, n)) if t else (np.full(n, 0), np.full(n, 0))
    flipped = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    out = np.empty_like(X)
    for i in range(n):
        image = X[i].reshape(C, H, W)
        padded = np.zeros((C, H + 2 * t, W + 2 * t), X.dtype)
        padded[:, t:t + H, t:t + W] = image
        crop = padded[:, dy[i]:dy[i] + H, dx[i]:dx[i] + W]
        if flipped[i]:
            crop = crop[:, :, ::-1]
        out[i] = crop.reshape(-1)
    return out


@pytest.mark.parametrize("flip,t", [(True, 1), (True, 4), (False, 3), (True, 0), (True, 15)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flip_and_translate_match_a_per_image_loop(flip, t, dtype):
    X = _images(40, seed=t, dtype=dtype)
    got = Augmentation(flip=flip, translate=t)(X, np.random.default_rng(7))
    want = _reference(X, flip, t, np.random.default_rng(7))
    assert got.shape == X.shape and got.dtype == X.dtype
    np.testing.assert_array_equal(got, want)


def test_flip_mirrors_or_leaves_each_image():
    X = _images(200, seed=1)
    out = Augmentation(flip=True)(X, np.random.default_rng(3))
    images, outs = X.reshape(-1, C, H, W), out.reshape(-1, C, H, W)
    same = np.all(outs == images, axis=(1, 2, 3))
    mirrored = np.all(outs == images[..., ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)  # exactly one of the two (random images: never both)
    assert 0.35 < mirrored.mean() < 0.65  # probability 1/2


def test_inactive_augmentation_returns_an_equal_copy():
    X = _images(5)
    aug = Augmentation()
    assert not aug.active
    out = aug(X, np.random.default_rng(0))
    assert out is not X and not np.shares_memory(out, X)
    np.testing.assert_array_equal(out, X)
    assert Augmentation(flip=False, translate=0, jitter=0.0).describe() == "none"


@pytest.mark.parametrize("aug", [Augmentation(flip=True), Augmentation(translate=3),
                                 Augmentation(jitter=0.2),
                                 Augmentation(flip=True, translate=2, jitter=0.1)])
def test_seeded_draws(aug):
    X = _images(16, seed=2)
    a = aug(X, np.random.default_rng(11))
    b = aug(X, np.random.default_rng(11))
    c = aug(X, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("aug", [Augmentation(flip=True), Augmentation(translate=5),
                                 Augmentation(jitter=0.3),
                                 Augmentation(flip=True, translate=2, jitter=0.1)])
def test_input_unchanged_and_dtype_kept(aug, dtype):
    X = _images(10, seed=3, dtype=dtype)
    before = X.copy()
    out = aug(X, np.random.default_rng(0))
    np.testing.assert_array_equal(X, before)
    assert out.dtype == np.dtype(dtype) and out.shape == X.shape
    assert not np.shares_memory(out, X)
    out += 1.0  # writing to the result leaves the input alone too
    np.testing.assert_array_equal(X, before)


def test_rows_of_a_larger_array_are_not_changed():
    """A batch is often a view into the training set (X_epoch[j*B:(j+1)*B])."""
    X = _images(30, seed=4)
    before = X.copy()
    aug = Augmentation(flip=True, translate=3, jitter=0.2)
    aug(X[10:20], np.random.default_rng(0))
    aug(X[::3], np.random.default_rng(1))
    np.testing.assert_array_equal(X, before)


def test_wrong_shape_names_the_expected_shape():
    aug = Augmentation(flip=True)
    for bad in (np.zeros((4, 20)), np.zeros((4, D + 1)), np.zeros(D), np.zeros((2, C, H, W))):
        with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(n, 3072\)"):
            aug(bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):  # inactive: still checked
        Augmentation()(np.zeros((4, 20)), np.random.default_rng(0))


@pytest.mark.parametrize("translate", [-1, 32, 40, 1.5, True, "2"])
def test_translate_out_of_range_raises(translate):
    with pytest.raises(ValueError, match="translate"):
        Augmentation(translate=translate)


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 2.0, float("nan")])
def test_jitter_out_of_range_raises(jitter):
    with pytest.raises(ValueError, match="jitter"):
        Augmentation(jitter=jitter)


def test_limits_accepted():
    assert Augmentation(translate=31).translate == 31
    assert Augmentation(translate=np.int64(2)).active
    assert Augmentation(jitter=0.99).active


@pytest.mark.parametrize("t", [1, 3])
def test_translation_moves_a_bright_pixel_by_at_most_t(t):
    n = 300
    c0, y0, x0 = 1, 10, 20
    X = np.zeros((n, D))
    X[:, (c0 * H + y0) * W + x0] = 5.0
    out = Augmentation(translate=t)(X, np.random.default_rng(5)).reshape(n, C, H, W)
    shifts = set()
    for image in out:
        where = np.argwhere(image != 0)
        assert len(where) == 1  # 10 ± t, 20 ± t stay inside the image
        c, y, x = where[0]
        assert c == c0 and image[c, y, x] == 5.0
        assert abs(y - y0) <= t and abs(x - x0) <= t
        shifts.add((y - y0, x - x0))
    # every vertical and every horizontal shift occurs in 300 draws
    assert {dy for dy, _ in shifts} == {dx for _, dx in shifts} == set(range(-t, t + 1))


def test_translation_of_a_constant_image_pads_with_zeros():
    t = 2
    out = Augmentation(translate=t)(np.ones((200, D)), np.random.default_rng(6))
    out = out.reshape(-1, C, H, W)
    assert set(np.unique(out)) <= {0.0, 1.0}
    for image in out:  # the ones form one (H - |dy|) × (W - |dx|) block in every channel
        rows, cols = np.flatnonzero(image[0].any(axis=1)), np.flatnonzero(image[0].any(axis=0))
        assert H - t <= len(rows) <= H and W - t <= len(cols) <= W
        assert image[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert image.sum() == C * len(rows) * len(cols)
    assert np.any(out == 0)


@pytest.mark.parametrize("j", [0.1, 0.5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jitter_is_an_affine_map_per_image(j, dtype):
    X = _images(200, seed=8, dtype=dtype)
    out = Augmentation(jitter=j)(X, np.random.default_rng(9))
    assert out.dtype == np.dtype(dtype)
    x, o = X.astype(np.float64), out.astype(np.float64)
    contrasts, brightnesses = [], []
    tol = 1e-5 if dtype == "float32" else 1e-12
    for xi, oi in zip(x, o):
        A = np.stack([xi, np.ones_like(xi)], axis=1)
        (c, b), *_ = np.linalg.lstsq(A, oi, rcond=None)
        np.testing.assert_allclose(oi, c * xi + b, atol=tol * (1 + np.abs(oi).max()))
        assert 1 - j - tol <= c <= 1 + j + tol and -j - tol <= b <= j + tol
        contrasts.append(c)
        brightnesses.append(b)
    # drawn per image, spread over the ranges
    assert np.ptp(contrasts) > j and np.ptp(brightnesses) > j
    assert np.mean(contrasts) == pytest.approx(1, abs=0.2 * j)
    assert np.mean(brightnesses) == pytest.approx(0, abs=0.2 * j)


def test_jitter_after_flip_and_translation():
    """Jitter draws come after the geometric ones: with the same generator, the result is
    the geometric augmentation mapped by c x + b, image by image."""
    X = _images(12, seed=10)
    geometric = Augmentation(flip=True, translate=2)(X, np.random.default_rng(4))
    full = Augmentation(flip=True, translate=2, jitter=0.3)(X, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    _reference(X, True, 2, rng)  # the same geometric draws, in the same order
    c = rng.uniform(0.7, 1.3, size=(12, 1))
    b = rng.uniform(-0.3, 0.3, size=(12, 1))
    np.testing.assert_allclose(full, c * geometric + b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layout", ["strided rows", "fortran"])
def test_non_contiguous_batches_match_the_loop(layout):
    X = _images(24, seed=11)
    X = X[::2] if layout == "strided rows" else np.asfortranarray(X)
    aug = Augmentation(flip=True, translate=3)
    got = aug(X, np.random.default_rng(2))
    np.testing.assert_array_equal(got, _reference(np.ascontiguousarray(X), True, 3,
                                                  np.random.default_rng(2)))
