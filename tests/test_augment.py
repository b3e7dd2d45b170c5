"""Augmentation: flips and translations against a plain per-image loop, jitter as an affine
map per image, seeded draws, input untouched, dtype kept, arguments checked."""

import numpy as np
import pytest

from klayer.levers.augment import IMAGE_SHAPE, Augmentation, Mixing, _pad, mirror, soft_targets

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


# --- padding modes ----------------------------------------------------------------------


def _border_index(k, size, mode):
    """Where a padded coordinate k (may lie outside 0..size-1) reads from the image."""
    if mode == "edge":
        return np.clip(k, 0, size - 1)
    k = np.where(k < 0, -k, k)  # reflect: mirror at the edge pixel, not repeating it
    return np.where(k > size - 1, 2 * (size - 1) - k, k)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
@pytest.mark.parametrize("t", [1, 3, 8, 31])
def test_pad_modes_read_the_mirrored_or_repeated_border(mode, t):
    """Each output pixel (c, y, x) is the input pixel at the border-mapped (y + dy - t,
    x + dx - t), with (dy, dx) the draws of the default mode."""
    n = 30
    X = _images(n, seed=20 + t)
    out = Augmentation(translate=t, pad_mode=mode)(X, np.random.default_rng(3))
    dy, dx = np.random.default_rng(3).integers(0, 2 * t + 1, size=(2, n))
    images, outs = X.reshape(n, C, H, W), out.reshape(n, C, H, W)
    for i in range(n):
        rows = _border_index(np.arange(H) + dy[i] - t, H, mode)
        cols = _border_index(np.arange(W) + dx[i] - t, W, mode)
        np.testing.assert_array_equal(outs[i], images[i][:, rows][:, :, cols])


@pytest.mark.parametrize("mode", ["mean", "reflect", "edge"])
@pytest.mark.parametrize("t", [1, 4, 31])
def test_the_padded_batch_is_np_pad_of_it(mode, t):
    images = _images(5, seed=t).reshape(5, C, H, W)[:, :, ::-1]  # a strided view
    want = np.pad(images, ((0, 0), (0, 0), (t, t), (t, t)),
                  **({"mode": "constant"} if mode == "mean" else {"mode": mode}))
    got = _pad(images, t, mode)
    assert got.dtype == images.dtype
    np.testing.assert_array_equal(got, want)


def test_pad_mode_draws_nothing_and_mean_is_the_default():
    X = _images(20, seed=21)
    states, outs = [], {}
    for mode in ("mean", "reflect", "edge"):
        rng = np.random.default_rng(8)
        outs[mode] = Augmentation(flip=True, translate=2, jitter=0.1, pad_mode=mode)(X, rng)
        states.append(rng.bit_generator.state)
    assert states[0] == states[1] == states[2]
    np.testing.assert_array_equal(
        outs["mean"], Augmentation(flip=True, translate=2, jitter=0.1)(X, np.random.default_rng(8)))
    assert not np.array_equal(outs["mean"], outs["reflect"])
    # a shift-free crop is the same in every mode: same pixels wherever no border is read
    inner = (slice(None), slice(None), slice(2, H - 2), slice(2, W - 2))
    a, b = (outs[m].reshape(-1, C, H, W) for m in ("mean", "reflect"))
    np.testing.assert_array_equal(a[inner], b[inner])


@pytest.mark.parametrize("mode", ["zero", "constant", "wrap", None])
def test_bad_pad_mode_raises(mode):
    with pytest.raises(ValueError, match="pad_mode"):
        Augmentation(translate=2, pad_mode=mode)


def test_describe_names_the_padding():
    assert Augmentation(flip=True, translate=3).describe() == "flips, translations ±3 px"
    assert Augmentation(translate=3, pad_mode="reflect").describe() == \
        "translations ±3 px (reflect padding)"


def test_mirror_is_the_flip_of_the_augmentation():
    X = _images(50, seed=22)
    M = mirror(X)
    assert M.shape == X.shape and not np.shares_memory(M, X)
    np.testing.assert_array_equal(mirror(M), X)
    np.testing.assert_array_equal(M.reshape(-1, C, H, W)[..., 0], X.reshape(-1, C, H, W)[..., -1])
    out = Augmentation(flip=True)(X, np.random.default_rng(0))
    assert all(np.array_equal(o, x) or np.array_equal(o, m) for o, x, m in zip(out, X, M))
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):
        mirror(np.zeros((2, 10)))


# --- MixUp and CutMix -------------------------------------------------------------------


def _constant_images(n):
    """Image i is the constant i (label i): a mixed pixel tells which images it came from."""
    return np.repeat(np.arange(n, dtype=np.float64)[:, None], D, axis=1), np.arange(n)


def test_inactive_mixing_draws_nothing_and_returns_copies():
    X, y = _constant_images(6)
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    mixing = Mixing()
    assert not mixing.active and mixing.describe() == "none"
    out, y_a, y_b, mix = mixing(X, y, rng)
    assert rng.bit_generator.state == before
    np.testing.assert_array_equal(out, X)
    assert not np.shares_memory(out, X)
    np.testing.assert_array_equal(y_a, y)
    np.testing.assert_array_equal(y_b, y)
    np.testing.assert_array_equal(mix, np.ones(6))


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_is_the_convex_combination_with_the_partner(alpha):
    n = 400
    X, y = _constant_images(n)
    out, y_a, y_b, mix = Mixing(mixup=alpha)(X, y, np.random.default_rng(1))
    np.testing.assert_array_equal(y_a, y)
    assert sorted(y_b) == list(range(n))  # a permutation of the batch
    np.testing.assert_allclose(out, (mix * y_a + (1 - mix) * y_b)[:, None] * np.ones(D),
                               rtol=1e-12, atol=1e-9)
    assert np.all((mix >= 0) & (mix <= 1)) and mix.dtype == np.float64
    # Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1)), drawn per example
    assert mix.mean() == pytest.approx(0.5, abs=0.05)
    assert mix.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.2)


@pytest.mark.parametrize("mixing", [Mixing(mixup=0.4), Mixing(cutmix=1.0)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mixing_keeps_the_dtype_and_the_input(mixing, dtype):
    X = _images(16, seed=23, dtype=dtype)
    y = np.arange(16) % 10
    before, y_before = X.copy(), y.copy()
    out, y_a, y_b, _ = mixing(X[::1], y, np.random.default_rng(2))
    assert out.dtype == np.dtype(dtype) and out.shape == X.shape
    assert not np.shares_memory(out, X) and not np.shares_memory(y_a, y)
    out += 1.0
    y_a += 1
    np.testing.assert_array_equal(X, before)
    np.testing.assert_array_equal(y, y_before)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_share_kept(alpha):
    n = 300
    X, y = _constant_images(n)
    out, y_a, y_b, mix = Mixing(cutmix=alpha)(X, y, np.random.default_rng(4))
    images = out.reshape(n, C, H, W)
    for i in range(n):
        image = images[i]
        assert set(np.unique(image)) <= {y_a[i], y_b[i]}
        if y_b[i] == y_a[i]:
            continue
        pasted = image == y_b[i]
        assert np.all(pasted == pasted[0])  # the same box in every channel
        rows, cols = np.flatnonzero(pasted[0].any(axis=1)), np.flatnonzero(pasted[0].any(axis=0))
        if len(rows):  # one filled rectangle
            assert pasted[0].sum() == len(rows) * len(cols)
            assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        assert mix[i] == pytest.approx(1 - pasted[0].mean(), abs=1e-12)
    # the λ drawn (after the permutation) gives the box size; clipping only shrinks it
    rng = np.random.default_rng(4)
    rng.permutation(n)
    drawn = rng.beta(alpha, alpha, size=n)
    cut = np.sqrt(1 - drawn)
    unclipped = 1 - np.floor(H * cut) * np.floor(W * cut) / (H * W)
    assert np.all(mix >= unclipped - 1e-12)
    assert np.mean(np.abs(mix - unclipped) < 1e-12) > 0.1  # boxes inside the image
    assert mix.min() < 0.2 and mix.max() > 0.8


def test_mixup_and_cutmix_together_pick_one_per_batch():
    X, y = _constant_images(64)
    mixing = Mixing(mixup=1.0, cutmix=1.0)
    kinds = set()
    rng = np.random.default_rng(5)
    for _ in range(30):
        out, y_a, y_b, mix = mixing(X, y, rng)
        blended = np.any(out % 1 != 0)  # MixUp makes fractions; CutMix only copies
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}
    assert mixing.describe() == "MixUp α=1, CutMix α=1"


@pytest.mark.parametrize("mixing", [Mixing(mixup=0.2), Mixing(cutmix=1.0),
                                    Mixing(mixup=0.3, cutmix=0.5)])
def test_mixing_is_seeded(mixing):
    X, y = _images(32, seed=24), np.arange(32) % 10
    a = mixing(X, y, np.random.default_rng(6))
    b = mixing(X, y, np.random.default_rng(6))
    c = mixing(X, y, np.random.default_rng(7))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kwargs", [{"mixup": -0.1}, {"cutmix": float("nan")},
                                    {"mixup": True}, {"cutmix": "1"}])
def test_bad_alpha_raises(kwargs):
    with pytest.raises(ValueError, match="mixup|cutmix"):
        Mixing(**kwargs)


def test_mixing_checks_shapes():
    with pytest.raises(ValueError, match=r"\(n, 3072\)"):
        Mixing(mixup=1.0)(np.zeros((4, 10)), np.zeros(4, int), np.random.default_rng(0))
    with pytest.raises(ValueError, match="one label per row"):
        Mixing(mixup=1.0)(np.zeros((4, D)), np.zeros(3, int), np.random.default_rng(0))


# --- soft targets -------------------------------------------------------------------------


def test_soft_targets_mix_one_hot_rows():
    y_a, y_b = np.array([0, 3, 2, 2]), np.array([1, 3, 0, 2])
    mix = np.array([0.25, 0.6, 1.0, 0.0])
    T = soft_targets(y_a, y_b, mix, 4)
    want = np.array([[0.25, 0.75, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(T, want, rtol=0, atol=1e-15)
    Ts = soft_targets(y_a, y_b, mix, 4, smoothing=0.2, dtype="float32")
    assert Ts.dtype == np.float32
    np.testing.assert_allclose(Ts, 0.8 * want + 0.05, rtol=1e-6)
    np.testing.assert_allclose(Ts.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(soft_targets(y_a, y_b, 1.0, 4), np.eye(4)[y_a])


def test_cross_entropy_of_soft_targets_is_the_mix_of_the_two_losses():
    """-Σ_c t_c log p_c = λ CE(y_a) + (1 - λ) CE(y_b), row by row."""
    from klayer.nn.layers import softmax_cross_entropy

    rng = np.random.default_rng(9)
    scores = rng.standard_normal((20, 5))
    y_a, y_b, mix = rng.integers(0, 5, 20), rng.integers(0, 5, 20), rng.random(20)
    T = soft_targets(y_a, y_b, mix, 5)
    z = scores - scores.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    for i in range(20):
        ce_a, _ = softmax_cross_entropy(scores[i:i + 1], y_a[i:i + 1])
        ce_b, _ = softmax_cross_entropy(scores[i:i + 1], y_b[i:i + 1])
        assert -(T[i] * log_p[i]).sum() == pytest.approx(mix[i] * ce_a + (1 - mix[i]) * ce_b,
                                                         rel=1e-12)


@pytest.mark.parametrize("args,match", [
    ((np.array([0, 1]), np.array([0]), np.array([1.0, 1.0])), "one length"),
    ((np.array([0, 4]), np.array([0, 1]), np.array([1.0, 1.0])), "y_a"),
    ((np.array([0, 1]), np.array([0.0, 1.0]), np.array([1.0, 1.0])), "y_b"),
    ((np.array([0, 1]), np.array([0, 1]), np.array([1.5, 1.0])), "mix"),
])
def test_soft_targets_check_their_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        soft_targets(*args, num_classes=4)
    with pytest.raises(ValueError, match="smoothing"):
        soft_targets(np.array([0]), np.array([0]), 1.0, 4, smoothing=1.0)
