"""Whitening: identity covariance on the training rows, ZCA symmetric and closest to the
input, PCA's k components, float32 output, a safe round trip, one-line errors."""

import json

import numpy as np
import pytest

from klayer.levers.whiten import Whitening


def _correlated(n=600, d=12, seed=0, dtype="float64"):
    """Rows with a full-rank covariance of widely spread eigenvalues and a non-zero mean."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) * np.logspace(0, -2, d)
    return (rng.standard_normal((n, d)) @ A.T + rng.uniform(-1, 1, d)).astype(dtype)


def _covariance(Z):
    Zc = Z - Z.mean(axis=0)
    return Zc.T @ Zc / len(Z)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitened_training_rows_have_identity_covariance(method):
    X = _correlated()
    Z = Whitening.fit(X, method, eps=1e-12).transform(X, "float64")
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(_covariance(Z), np.eye(X.shape[1]), atol=1e-6)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_eps_shrinks_each_direction_to_lam_over_lam_plus_eps(method):
    X = _correlated()
    eps = 1e-3
    w = Whitening.fit(X, method, eps=eps)
    lam = np.linalg.eigvalsh(_covariance(X))[::-1]
    np.testing.assert_allclose(w.eigenvalues, lam, rtol=1e-9, atol=1e-12)
    cov = _covariance(w.transform(X, "float64"))
    want = lam / (lam + eps)
    got = np.diag(cov) if method == "pca" else np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(got, want, rtol=1e-8)
    assert want.min() < 0.9  # the test data has directions of variance below ε


def test_zca_is_the_symmetric_inverse_square_root():
    X = _correlated(d=10)
    eps = 1e-2
    M = Whitening.fit(X, "zca", eps=eps).matrix
    np.testing.assert_array_equal(M, M.T)
    C = _covariance(X) + eps * np.eye(10)
    np.testing.assert_allclose(M @ C @ M, np.eye(10), atol=1e-9)  # M = (C + εI)^(-1/2)
    assert np.all(np.linalg.eigvalsh(M) > 0)


def test_zca_is_the_whitening_closest_to_its_input():
    """Any whitening is ZCA followed by a rotation; ZCA's output is nearest to x - μ."""
    X = _correlated()
    zca, pca = Whitening.fit(X, "zca", eps=1e-12), Whitening.fit(X, "pca", eps=1e-12)
    Xc = X - X.mean(axis=0)
    distance = {name: np.mean((w.transform(X, "float64") - Xc) ** 2)
                for name, w in (("zca", zca), ("pca", pca))}
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((12, 12)))
    rotated = np.mean((zca.transform(X, "float64") @ Q - Xc) ** 2)
    assert distance["zca"] < distance["pca"] and distance["zca"] < rotated
    # and PCA is ZCA followed by the rotation U (the eigenvectors): p = z U
    U = pca.matrix * np.sqrt(pca.eigenvalues + 1e-12)
    np.testing.assert_allclose(U.T @ U, np.eye(12), atol=1e-9)
    np.testing.assert_allclose(pca.transform(X, "float64"), zca.transform(X, "float64") @ U,
                               atol=1e-6)


def test_pca_keeps_the_top_components():
    X = _correlated(d=12)
    w = Whitening.fit(X, "pca", eps=1e-12, components=4)
    Z = w.transform(X, "float64")
    assert Z.shape == (len(X), 4) and w.output_size == 4 and w.input_size == 12
    np.testing.assert_allclose(_covariance(Z), np.eye(4), atol=1e-6)
    # the kept directions carry the largest variance: they project onto the top eigenvectors
    full = Whitening.fit(X, "pca", eps=1e-12).transform(X, "float64")
    np.testing.assert_allclose(np.abs(Z), np.abs(full[:, :4]), atol=1e-6)


def test_fit_on_float32_rows_and_float32_output():
    X = _correlated(n=500, d=20, dtype="float32")
    w = Whitening.fit(X, "zca")
    assert w.matrix.dtype == np.float64 and w.mean.dtype == np.float64
    Z32 = w.transform(X)  # float32 by default
    Z64 = w.transform(X, "float64")
    assert Z32.dtype == np.float32 and Z64.dtype == np.float64
    np.testing.assert_allclose(Z32, Z64, rtol=1e-4, atol=1e-4)


def test_chunks_change_nothing(monkeypatch):
    X = _correlated(n=300, d=8)
    whole = Whitening.fit(X, "zca", eps=1e-3)
    monkeypatch.setattr("klayer.levers.whiten.FIT_CHUNK", 7)
    chunked = Whitening.fit(X, "zca", eps=1e-3)
    np.testing.assert_allclose(chunked.matrix, whole.matrix, rtol=1e-10)
    np.testing.assert_allclose(whole.transform(X, "float64", chunk=13),
                               whole.transform(X, "float64"), rtol=1e-12, atol=1e-12)


def test_round_trip_through_plain_arrays_and_json(tmp_path):
    X = _correlated(d=9)
    for w in (Whitening.fit(X, "zca"), Whitening.fit(X, "pca", components=5)):
        arrays, meta = w.to_arrays()
        np.savez(tmp_path / "w.npz", **arrays)
        with np.load(tmp_path / "w.npz", allow_pickle=False) as f:
            loaded = {k: f[k] for k in f.files}
        back = Whitening.from_arrays(loaded, json.loads(json.dumps(meta)))
        assert (back.method, back.eps, back.components) == (w.method, w.eps, w.components)
        np.testing.assert_array_equal(back.transform(X), w.transform(X))
    arrays, meta = Whitening.fit(X, "pca", components=5).to_arrays()
    with pytest.raises(ValueError, match="output_size"):
        Whitening.from_arrays(arrays, {**meta, "output_size": 6})
    with pytest.raises(ValueError, match="do not fit together"):
        Whitening.from_arrays(arrays, {**meta, "components": 4, "output_size": 4})
    with pytest.raises(ValueError, match="lacks"):
        Whitening.from_arrays({"mean": arrays["mean"]}, meta)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad):
    X = _correlated(d=6)
    X_bad = X.copy()
    X_bad[17, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        Whitening.fit(X_bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        Whitening.fit(X).transform(X_bad)


@pytest.mark.parametrize("eps", [0, -1e-3, np.nan, np.inf, True, "0.01"])
def test_bad_eps_is_refused(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        Whitening.fit(_correlated(d=4), eps=eps)


def test_bad_arguments_are_one_line_errors():
    X = _correlated(d=4)
    cases = [
        (lambda: Whitening.fit(X, "pcaa"), "method must be one of"),
        (lambda: Whitening.fit(X, "zca", components=2), "components applies to PCA"),
        (lambda: Whitening.fit(X, "pca", components=5), r"components must be .* \[1, 4\]"),
        (lambda: Whitening.fit(X, "pca", components=0), "components"),
        (lambda: Whitening.fit(X[:1]), "n >= 2"),
        (lambda: Whitening.fit(X.astype(int)), "floats"),
        (lambda: Whitening.fit(X).transform(X[:, :3]), r"\(n, 4\)"),
        (lambda: Whitening.fit(X).transform(X, "int32"), "float32 or float64"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_symmetry_makes_zca_commute_with_the_mirror():
    from klayer.levers.augment import mirror

    shape = (3, 4, 5)
    d = 60
    rng = np.random.default_rng(5)
    X = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.uniform(-1, 1, d)
    p = mirror(np.arange(d)[None], shape)[0]  # mirror(x) = x[p]
    np.testing.assert_array_equal(mirror(X, shape), X[:, p])
    plain = Whitening.fit(X, "zca", eps=1e-3)
    sym = Whitening.fit(X, "zca", eps=1e-3, symmetry=p)
    Z = sym.transform(X, "float64")
    np.testing.assert_allclose(sym.transform(mirror(X, shape), "float64"), mirror(Z, shape),
                               rtol=1e-9, atol=1e-9)
    assert not np.allclose(plain.transform(mirror(X, shape), "float64"),
                           mirror(plain.transform(X, "float64"), shape), atol=1e-3)
    # the same as fitting on the data together with its mirror images
    both = Whitening.fit(np.concatenate([X, mirror(X, shape)]), "zca", eps=1e-3)
    np.testing.assert_allclose(sym.matrix, both.matrix, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="permutation of range"):
        Whitening.fit(X, symmetry=np.zeros(d, int))


@pytest.mark.parametrize("method,components", [("zca", None), ("pca", 5)])
def test_folding_into_the_first_layer_gives_the_same_network(method, components):
    from klayer.nn.network import Network

    X = _correlated(d=12)
    w = Whitening.fit(X, method, eps=1e-3, components=components)
    Z = w.transform(X, "float64")
    net = Network(Z.shape[1], [7], 3, batch_norm=True, seed=2)
    net.update_running_stats(net.forward(Z[:100], "train").batch_stats)
    net.params["b1"] += 0.3  # a non-zero bias too
    folded = Network(12, [7], 3, batch_norm=True, seed=2)
    folded.params.update({k: v.copy() for k, v in net.params.items()})
    folded.params["W1"], folded.params["b1"] = w.fold_into(net.params["W1"], net.params["b1"])
    folded.update_running_stats({1: (net.buffers["running_mean1"], net.buffers["running_var1"])})
    np.testing.assert_allclose(folded.scores(X), net.scores(Z), rtol=1e-9, atol=1e-9)
    W32, b32 = w.fold_into(net.params["W1"].astype(np.float32), net.params["b1"].astype(np.float32))
    assert W32.dtype == b32.dtype == np.float32 and W32.shape == (7, 12)
    with pytest.raises(ValueError, match="fold"):
        w.fold_into(np.zeros((7, 13)), np.zeros(7))
