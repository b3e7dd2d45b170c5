"""klayer diagnose against two independent "student" implementations.

The students below are written the way a course asks for them, in plain NumPy and in
their own layout, without any klayer code: a column-layout one (X d×n, W m×d, the
batch-norm backward pass as the course's sequence of formulas with σ1 = (v+ε)^-1/2,
σ2 = (v+ε)^-3/2) and a row-layout one (X n×d, W d×m, the backward pass staged through
dvar and dμ). Each has one switch per catalogued analytic bug, and a numerical gradient
with one switch per catalogued checker bug. They read the case file and write their
gradients to .npz or .mat, as a student would; the tests then run `klayer diagnose`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.io

from klayer import cli
from klayer import diagnose as D
from klayer.diagnose import bugs as B
from klayer.diagnose import case as C
from klayer.nn import gradcheck as G

ANALYTIC = ["variance-not-biased", "gamma-missing-in-backward", "mean-term-missing",
            "variance-term-missing", "relu-mask-from-wrong-tensor", "l2-factor",
            "loss-not-averaged", "eps-outside-sqrt"]


# --- the students -----------------------------------------------------------------------


def read_case(path):
    """What a student does: load the file, take the arrays."""
    if str(path).endswith(".mat"):
        f = scipy.io.loadmat(str(path))
        layout = str(f["layout"][0]).strip()
    else:
        f = dict(np.load(path, allow_pickle=False))
        layout = str(f["layout"])
    k = sum(1 for key in f if key.startswith("W"))
    get = lambda key: np.array(f[key], dtype=np.float64)  # noqa: E731
    return {"X": get("X"), "Y": get("Y"), "k": k, "layout": layout,
            "W": [get(f"W{l}") for l in range(1, k + 1)],
            "b": [get(f"b{l}") for l in range(1, k + 1)],
            "gamma": [get(f"gamma{l}") for l in range(1, k)],
            "beta": [get(f"beta{l}") for l in range(1, k)],
            "lam": float(np.ravel(f["lam"])[0]), "eps": float(np.ravel(f["eps"])[0])}


class ColumnStudent:
    """DD2424 style: X d×n, W m×d, b m×1; s = W x + b."""

    def __init__(self, case, bug=None):
        self.c, self.bug = case, bug
        self.c["b"] = [b.reshape(-1, 1) for b in case["b"]]
        self.c["gamma"] = [g.reshape(-1, 1) for g in case["gamma"]]
        self.c["beta"] = [b.reshape(-1, 1) for b in case["beta"]]

    def forward(self, W, b, gamma, beta, fixed=None):
        c, bug = self.c, self.bug
        X, n = c["X"], c["X"].shape[1]
        xs, Ss, S_hats, mus, vs = [X], [], [], [], []
        h = X
        for l in range(c["k"] - 1):
            S = W[l] @ h + b[l]
            if fixed is None:
                mu = np.sum(S, axis=1, keepdims=True) / n
                denom = n - 1 if bug == "variance-not-biased" else n
                v = np.sum((S - mu) ** 2, axis=1, keepdims=True) / denom
            else:
                mu, v = fixed[l]
            if bug == "eps-outside-sqrt":
                S_hat = (S - mu) / (np.sqrt(v) + c["eps"])
            else:
                S_hat = np.diag(((v + c["eps"]) ** -0.5).ravel()) @ (S - mu)
            S_t = gamma[l] * S_hat + beta[l]
            h = np.maximum(0, S_t)
            Ss.append(S)
            S_hats.append(S_hat)
            mus.append(mu)
            vs.append(v)
            xs.append(h)
        S = W[-1] @ h + b[-1]
        P = np.exp(S - S.max(axis=0)) / np.sum(np.exp(S - S.max(axis=0)), axis=0)
        return P, xs, Ss, S_hats, mus, vs

    def cost(self, W, b, gamma, beta, fixed=None):
        P = self.forward(W, b, gamma, beta, fixed)[0]
        c = self.c
        n = c["X"].shape[1]
        loss = -np.sum(c["Y"] * np.log(P)) / n
        return loss + c["lam"] * sum(np.sum(w * w) for w in W)

    def gradients(self):
        c, bug = self.c, self.bug
        W, b, gamma, beta = c["W"], c["b"], c["gamma"], c["beta"]
        n, k, lam, eps = c["X"].shape[1], c["k"], c["lam"], c["eps"]
        P, xs, Ss, S_hats, mus, vs = self.forward(W, b, gamma, beta)
        gW, gb, gg, gbe = [None] * k, [None] * k, [None] * (k - 1), [None] * (k - 1)
        G_ = -(c["Y"] - P)
        if bug != "loss-not-averaged":
            G_ = G_ / n
        reg = lam if bug == "l2-factor" else 2 * lam
        gW[k - 1] = G_ @ xs[k - 1].T + reg * W[k - 1]
        gb[k - 1] = G_ @ np.ones((n, 1))
        G_ = W[k - 1].T @ G_
        G_ = G_ * ((Ss[k - 2] if bug == "relu-mask-from-wrong-tensor" else xs[k - 1]) > 0)
        for l in range(k - 2, -1, -1):
            gg[l] = (G_ * S_hats[l]) @ np.ones((n, 1))
            gbe[l] = G_ @ np.ones((n, 1))
            if bug != "gamma-missing-in-backward":
                G_ = G_ * (gamma[l] @ np.ones((1, n)))
            # BatchNormBackPass
            if bug == "eps-outside-sqrt":
                sigma1 = 1 / (np.sqrt(vs[l]) + eps)
                sigma2 = sigma1 ** 3
            else:
                sigma1 = (vs[l] + eps) ** -0.5
                sigma2 = (vs[l] + eps) ** -1.5
            G1 = G_ * (sigma1 @ np.ones((1, n)))
            G2 = G_ * (sigma2 @ np.ones((1, n)))
            D_ = Ss[l] - mus[l] @ np.ones((1, n))
            c_ = (G2 * D_) @ np.ones((n, 1))
            G_ = G1.copy()
            if bug != "mean-term-missing":
                G_ = G_ - (G1 @ np.ones((n, 1))) @ np.ones((1, n)) / n
            if bug != "variance-term-missing":
                G_ = G_ - D_ * (c_ @ np.ones((1, n))) / n
            gW[l] = G_ @ xs[l].T + reg * W[l]
            gb[l] = G_ @ np.ones((n, 1))
            if l > 0:
                G_ = W[l].T @ G_
                G_ = G_ * ((Ss[l - 1] if bug == "relu-mask-from-wrong-tensor" else xs[l]) > 0)
        return _named(gW, gb, gg, gbe)

    def numeric(self, checker=None, h=1e-5):
        """Centred differences of the student's own cost, with a checker bug or none."""
        c = self.c
        dtype = np.float32 if checker == "float32-numeric" else np.float64
        params = {"W": [w.astype(dtype) for w in c["W"]], "b": [x.astype(dtype) for x in c["b"]],
                  "gamma": [x.astype(dtype) for x in c["gamma"]],
                  "beta": [x.astype(dtype) for x in c["beta"]]}
        saved = c["X"], c["Y"]
        c["X"], c["Y"] = c["X"].astype(dtype), c["Y"].astype(dtype)
        fixed = None
        if checker == "numeric-with-running-stats":
            _, _, _, _, mus, vs = self.forward(params["W"], params["b"], params["gamma"],
                                               params["beta"])
            fixed = list(zip(mus, vs))
        h = {"step-too-large": 1e-2, "float32-numeric": 1e-4}.get(checker, h)
        out = {}
        for kind in ("W", "b", "gamma", "beta"):
            out[kind] = []
            for theta in params[kind]:
                g = np.zeros(theta.shape)
                for i in np.ndindex(theta.shape):
                    old = theta[i]
                    theta[i] = old + dtype(h)
                    plus = self.cost(**params, fixed=fixed)
                    theta[i] = old - dtype(h)
                    minus = self.cost(**params, fixed=fixed)
                    theta[i] = old
                    g[i] = (plus - minus) / (2 * h)
                out[kind].append(g)
        c["X"], c["Y"] = saved
        return _named(out["W"], out["b"], out["gamma"], out["beta"])


class RowStudent:
    """cs231n style: X n×d, W d×m, b (m,); s = x W + b; batch norm staged backward."""

    def __init__(self, case, bug=None):
        self.c, self.bug = case, bug
        for key in ("b", "gamma", "beta"):
            self.c[key] = [np.ravel(v) for v in case[key]]
        self.y = np.argmax(case["Y"], axis=1)

    def forward(self, W, b, gamma, beta, fixed=None):
        c, bug = self.c, self.bug
        out, caches = c["X"], []
        for l in range(c["k"] - 1):
            a = out.dot(W[l]) + b[l]
            if fixed is None:
                mu = a.mean(axis=0)
                var = a.var(axis=0, ddof=1 if bug == "variance-not-biased" else 0)
            else:
                mu, var = fixed[l]
            xmu = a - mu
            if bug == "eps-outside-sqrt":
                std = np.sqrt(var) + c["eps"]
            else:
                std = np.sqrt(var + c["eps"])
            ivar = 1.0 / std
            xhat = xmu * ivar
            bn = gamma[l] * xhat + beta[l]
            relu = np.maximum(bn, 0)
            caches.append((out, a, xmu, ivar, xhat, bn, mu, var))
            out = relu
        scores = out.dot(W[-1]) + b[-1]
        return scores, out, caches

    def loss(self, W, b, gamma, beta, fixed=None):
        scores, _, _ = self.forward(W, b, gamma, beta, fixed)
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        N = scores.shape[0]
        return -log_probs[np.arange(N), self.y].mean() + \
            self.c["lam"] * sum(np.sum(w ** 2) for w in W)

    def gradients(self):
        c, bug = self.c, self.bug
        W, b, gamma, beta = c["W"], c["b"], c["gamma"], c["beta"]
        k = c["k"]
        scores, last, caches = self.forward(W, b, gamma, beta)
        N = scores.shape[0]
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        dscores = probs.copy()
        dscores[np.arange(N), self.y] -= 1
        if bug != "loss-not-averaged":
            dscores /= N
        reg = 0.5 if bug == "l2-factor" else 1.0
        grads = {f"W{k}": last.T.dot(dscores) + reg * 2 * c["lam"] * W[-1],
                 f"b{k}": dscores.sum(axis=0)}
        dout = dscores.dot(W[-1].T)
        for l in range(k - 2, -1, -1):
            x_in, a, xmu, ivar, xhat, bn, mu, var = caches[l]
            mask = a > 0 if bug == "relu-mask-from-wrong-tensor" else bn > 0
            dbn = dout * mask
            grads[f"beta{l + 1}"] = dbn.sum(axis=0)
            grads[f"gamma{l + 1}"] = (dbn * xhat).sum(axis=0)
            dxhat = dbn if bug == "gamma-missing-in-backward" else dbn * gamma[l]
            dvar = np.sum(dxhat * xmu, axis=0) * -0.5 * ivar ** 3
            dmu = np.sum(-dxhat * ivar, axis=0) + dvar * np.mean(-2.0 * xmu, axis=0)
            da = dxhat * ivar
            if bug != "variance-term-missing":
                da = da + dvar * 2.0 * xmu / N
            if bug != "mean-term-missing":
                da = da + dmu / N
            grads[f"W{l + 1}"] = x_in.T.dot(da) + reg * 2 * c["lam"] * W[l]
            grads[f"b{l + 1}"] = da.sum(axis=0)
            dout = da.dot(W[l].T)
        return grads

    def numeric(self, checker=None, h=1e-5):
        c = self.c
        dtype = np.float32 if checker == "float32-numeric" else np.float64
        params = {key: [v.astype(dtype) for v in c[key]] for key in ("W", "b", "gamma", "beta")}
        saved = c["X"]
        c["X"] = c["X"].astype(dtype)
        fixed = None
        if checker == "numeric-with-running-stats":
            fixed = [(ca[6], ca[7]) for ca in self.forward(**params)[2]]
        h = {"step-too-large": 3e-2, "float32-numeric": 1e-5}.get(checker, h)
        grads = {}
        for key in ("W", "b", "gamma", "beta"):
            for l, theta in enumerate(params[key], 1):
                g = np.zeros(theta.shape)
                it = np.nditer(theta, flags=["multi_index"])
                while not it.finished:
                    i = it.multi_index
                    old = theta[i]
                    theta[i] = old + h
                    fp = self.loss(**params, fixed=fixed)
                    theta[i] = old - h
                    fm = self.loss(**params, fixed=fixed)
                    theta[i] = old
                    g[i] = (fp - fm) / (2 * h)
                    it.iternext()
                grads[f"{key}{l}"] = g
        c["X"] = saved
        return grads


def _named(gW, gb, gg, gbe):
    out = {}
    for l in range(len(gW)):
        out[f"W{l + 1}"], out[f"b{l + 1}"] = gW[l], gb[l]
        if l < len(gg):
            out[f"gamma{l + 1}"], out[f"beta{l + 1}"] = gg[l], gbe[l]
    return out


STUDENTS = {"columns": ColumnStudent, "rows": RowStudent}


def save(path, grads):
    if str(path).endswith(".mat"):
        scipy.io.savemat(str(path), grads)
    else:
        np.savez(path, **grads)


def run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """A case file per layout and format, written by the command."""
    folder = tmp_path_factory.mktemp("cases")
    paths = {}
    for layout in ("columns", "rows"):
        for fmt in ("npz", "mat"):
            path = folder / f"case_{layout}.{fmt}"
            assert cli.main(["diagnose", "make-case", str(path), "--layout", layout]) == 0
            paths[layout, fmt] = path
    return paths


# --- the planted-bug backward pass equals the core's -----------------------------------


@pytest.mark.parametrize("hidden,layout,seed", [((8, 6), "columns", 0), ((5,), "rows", 3),
                                                ((7, 7, 4), "columns", 11)])
def test_planted_backward_without_bug_equals_the_core(hidden, layout, seed):
    case = D.make_case(hidden, dims=6, samples=9, classes=3, layout=layout, seed=seed)
    exact = case.exact_gradients()
    mine = B.planted_gradients(case)
    assert set(mine) == set(exact)
    for name in exact:
        np.testing.assert_allclose(mine[name], exact[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bug", ANALYTIC)
def test_every_planted_bug_changes_the_gradients(bug):
    case = D.make_case()
    exact = case.exact_gradients()
    planted = B.planted_gradients(case, bug)
    assert max(float(np.abs(planted[n] - exact[n]).max()) for n in exact) > 1e-6


def test_catalogue_ids_are_stable_and_documented():
    assert B.ANALYTIC == ANALYTIC
    assert B.NUMERICAL == ["numeric-with-running-stats", "bn-bias-false-alarm",
                           "step-too-large", "float32-numeric"]
    for bug in B.CATALOGUE:
        assert bug.symptom and bug.fix and bug.breaks and bug.explanation


# --- the students against klayer -------------------------------------------------------


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_students_agree_with_their_own_numerical_gradient(cases, layout):
    """The students are right when bug-free: their analytic gradient matches their own
    centred differences (klayer is not involved)."""
    student = STUDENTS[layout](read_case(cases[layout, "npz"]))
    analytic, numeric = student.gradients(), student.numeric()
    for name in analytic:
        kind = name.rstrip("0123456789")
        if kind == "b" and int(name[1:]) < student.c["k"]:
            assert np.abs(np.ravel(numeric[name])).max() < 1e-8  # exactly 0 in theory
            continue
        assert G.relative_error(np.ravel(analytic[name]), np.ravel(numeric[name])) < 1e-7


@pytest.mark.parametrize("fmt", ["npz", "mat"])
@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_correct_student_is_called_correct(cases, layout, fmt, tmp_path, capsys):
    grads = tmp_path / f"grads.{fmt}"
    save(grads, STUDENTS[layout](read_case(cases[layout, fmt])).gradients())
    status, out, err = run(["diagnose", "check", cases[layout, fmt], grads], capsys)
    assert status == 0, err
    assert "verdict: correct" in out
    assert "wrong" not in out.split("verdict")[0]


def test_correct_float32_student_is_called_correct(cases, tmp_path, capsys):
    case = read_case(cases["rows", "npz"])
    for key in ("X", "Y"):
        case[key] = case[key].astype(np.float32)
    for key in ("W", "b", "gamma", "beta"):
        case[key] = [v.astype(np.float32) for v in case[key]]
    case["lam"], case["eps"] = np.float32(case["lam"]), np.float32(case["eps"])
    grads = RowStudent(case).gradients()
    assert grads["W1"].dtype == np.float32
    save(tmp_path / "grads.npz", grads)
    status, out, err = run(["diagnose", "check", cases["rows", "npz"], tmp_path / "grads.npz",
                            "--json"], capsys)
    assert status == 0, out
    errors = [t["error"] for t in json.loads(out)["tensors"].values()]
    assert 1e-9 < max(errors) < 1e-5  # float32 rounding: visible, and within tolerance


@pytest.mark.parametrize("bug", ANALYTIC)
@pytest.mark.parametrize("fmt", ["npz", "mat"])
@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_each_planted_bug_is_ranked_first(cases, layout, fmt, bug, tmp_path, capsys):
    grads = tmp_path / f"grads.{fmt}"
    save(grads, STUDENTS[layout](read_case(cases[layout, fmt]), bug).gradients())
    status, out, err = run(["diagnose", "check", cases[layout, fmt], grads, "--json"], capsys)
    assert status == 1, err
    result = json.loads(out)
    assert result["verdict"] == "wrong"
    assert result["likely"][0]["bug"] == bug
    assert result["likely"][0]["explains_exactly"]
    assert not result["likely"][1]["explains_exactly"]
    assert any(t["status"] == "wrong" for t in result["tensors"].values())


@pytest.mark.parametrize("checker", ["numeric-with-running-stats", "step-too-large",
                                     "float32-numeric"])
@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_each_checker_bug_is_named(cases, layout, checker, tmp_path, capsys):
    student = STUDENTS[layout](read_case(cases[layout, "npz"]))
    save(tmp_path / "grads.npz", student.gradients())
    save(tmp_path / "num.npz", student.numeric(checker))
    status, out, err = run(["diagnose", "check", cases[layout, "npz"], tmp_path / "grads.npz",
                            "--numeric", tmp_path / "num.npz", "--json"], capsys)
    assert status == 0, err  # the analytic gradient is right
    result = json.loads(out)
    assert result["verdict"] == "correct"
    assert result["numeric"]["verdict"] == "wrong"
    assert result["numeric"]["likely"][0]["bug"] == checker


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_bias_false_alarm_is_named_for_correct_code(cases, layout, tmp_path, capsys):
    student = STUDENTS[layout](read_case(cases[layout, "npz"]))
    analytic, numeric = student.gradients(), student.numeric()
    # what the student's own check says about b1: a relative error with a tiny floor
    a, n = np.ravel(analytic["b1"]), np.ravel(numeric["b1"])
    assert np.max(np.abs(a - n) / np.maximum(1e-300, np.abs(a) + np.abs(n))) > 0.5
    save(tmp_path / "grads.npz", analytic)
    save(tmp_path / "num.npz", numeric)
    status, out, err = run(["diagnose", "check", cases[layout, "npz"], tmp_path / "grads.npz",
                            "--numeric", tmp_path / "num.npz"], capsys)
    assert status == 0, err
    assert "your numerical gradient: correct" in out
    numeric_part = out.split("your numerical gradient")[1]
    assert "1. bn-bias-false-alarm" in numeric_part
    assert "b1" in numeric_part.split("bn-bias-false-alarm")[1].splitlines()[0]


def test_bug_in_analytic_and_checker_both_reported(cases, tmp_path, capsys):
    student = ColumnStudent(read_case(cases["columns", "npz"]), "mean-term-missing")
    save(tmp_path / "grads.npz", student.gradients())
    save(tmp_path / "num.npz", ColumnStudent(read_case(cases["columns", "npz"])).numeric(
        "numeric-with-running-stats"))
    status, out, _ = run(["diagnose", "check", cases["columns", "npz"], tmp_path / "grads.npz",
                          "--numeric", tmp_path / "num.npz", "--json"], capsys)
    result = json.loads(out)
    assert status == 1
    assert result["likely"][0]["bug"] == "mean-term-missing"
    assert result["numeric"]["likely"][0]["bug"] == "numeric-with-running-stats"


# --- unusable input: one line, exit 2 ----------------------------------------------------


def _correct(cases, layout="columns"):
    return STUDENTS[layout](read_case(cases[layout, "npz"])).gradients()


@pytest.mark.parametrize("change,expected", [
    (lambda g: g.pop("gamma2"), "GRADS has no gamma2"),
    (lambda g: g.__setitem__("W2", g["W2"].T), "W2 has shape 8×6, expected 6×8"),
    (lambda g: g["b1"].__setitem__((3, 0), np.nan), "b1 contains NaN"),
    (lambda g: g.__setitem__("beta1", np.ones(5)), "beta1 has shape 5, expected 8×1"),
    (lambda g: [g.__setitem__(k, v.T) for k, v in list(g.items()) if k.startswith("W")],
     "GRADS is in the rows layout"),
])
def test_unusable_gradients_get_one_line_and_exit_2(cases, change, expected, tmp_path, capsys):
    grads = _correct(cases)
    change(grads)
    save(tmp_path / "g.npz", grads)
    status, out, err = run(["diagnose", "check", cases["columns", "npz"], tmp_path / "g.npz"],
                           capsys)
    assert status == 2
    assert out == ""
    assert err.startswith("klayer diagnose: error: ") and err.count("\n") == 1
    assert expected in err


def test_transposed_W_says_so_and_rows_case_names_its_shape(cases, tmp_path, capsys):
    grads = _correct(cases, "rows")
    grads["W1"] = grads["W1"].T
    save(tmp_path / "g.npz", grads)
    status, _, err = run(["diagnose", "check", cases["rows", "npz"], tmp_path / "g.npz"], capsys)
    assert status == 2
    assert "W1 has shape 8×10, expected 10×8 (d × m_1, rows layout); it looks transposed" in err


@pytest.mark.parametrize("argv,expected", [
    (["diagnose", "check", "absent.npz", "absent.npz"], "CASE: no file absent.npz"),
    (["diagnose", "make-case", "case.txt"], "must end in .npz or .mat"),
    (["diagnose", "make-case", "c.npz", "--samples", "2"], "samples"),
    (["diagnose", "make-case", "c.npz", "--hidden", "none"], "at least one hidden layer"),
    (["diagnose", "table", "absent.md"], "no file absent.md"),
])
def test_bad_arguments_exit_2(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(argv, capsys)
    assert status == 2
    assert expected in err and err.count("\n") == 1


def test_pickled_gradients_are_refused(cases, tmp_path, capsys):
    path = tmp_path / "g.npz"
    np.savez(path, W1=np.array([{"a": 1}], dtype=object))
    status, _, err = run(["diagnose", "check", cases["columns", "npz"], path], capsys)
    assert status == 2 and "pickled" in err


def test_mat_without_scipy_says_how_to_install(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    status, _, err = run(["diagnose", "make-case", tmp_path / "c.mat"], capsys)
    assert status == 2
    assert "pip install 'klayer[mat]'" in err


# --- make-case ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_case_file_holds_the_model_in_its_layout(cases, layout):
    npz = dict(np.load(cases[layout, "npz"], allow_pickle=False))
    mat = scipy.io.loadmat(str(cases[layout, "mat"]))
    d, n, K = 10, 8, 4
    assert str(npz["layout"]) == layout
    cols = layout == "columns"
    assert npz["X"].shape == ((d, n) if cols else (n, d))
    assert npz["Y"].shape == ((K, n) if cols else (n, K))
    assert npz["W1"].shape == ((8, d) if cols else (d, 8))
    assert npz["W3"].shape == ((K, 6) if cols else (6, K))
    assert npz["gamma2"].shape == ((6, 1) if cols else (1, 6))
    Y = npz["Y"] if cols else npz["Y"].T
    np.testing.assert_array_equal(np.argmax(Y, axis=0), npz["y"])
    for key in ("X", "Y", "W1", "b2", "gamma1", "beta2", "W3"):
        np.testing.assert_array_equal(mat[key], npz[key])
    assert float(mat["lam"][0, 0]) == float(npz["lam"]) == 0.1
    for l in (1, 2):  # every bug must show: γ ≠ 1, β ≠ 0
        assert np.abs(npz[f"gamma{l}"] - 1).min() > 1e-3
        assert np.abs(npz[f"beta{l}"]).min() > 1e-3
    case = C.case_from_arrays(npz)
    assert G.relu_margin(case.network(), case.X) > G.KINK_MARGIN


def test_without_l2_the_l2_bug_is_not_a_candidate(tmp_path, capsys):
    path = tmp_path / "case.npz"
    assert cli.main(["diagnose", "make-case", str(path), "--lambda", "0"]) == 0
    grads = ColumnStudent(read_case(path), "variance-term-missing").gradients()
    d = D.check(path, grads)
    assert d.likely[0]["bug"] == "variance-term-missing"
    assert "l2-factor" not in [r["bug"] for r in d.ranking]


def test_both_layouts_describe_the_same_problem(cases):
    a = C.case_from_arrays(dict(np.load(cases["columns", "npz"])))
    b = C.case_from_arrays(dict(np.load(cases["rows", "npz"])))
    np.testing.assert_array_equal(a.X, b.X)
    for name in a.names:
        np.testing.assert_array_equal(a.params[name], b.params[name])


def test_diagnose_help_lists_every_flag_of_its_actions(capsys):
    """`klayer diagnose --help` names every action's flags (the README's command lines are
    checked against it)."""
    assert cli.main(["diagnose", "--help"]) == 0
    top = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    for action in ("make-case", "check", "table"):
        assert cli.main(["diagnose", action, "--help"]) == 0
        flags = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out)) - {"--help"}
        assert flags <= top, action


def test_help_documents_the_model(capsys):
    assert cli.main(["diagnose", "make-case", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("biased (1/n)", "sqrt(v_l + ε)", "λ Σ_l ||W_l||²", "X is d×n", "X is n×d",
                 "s = x W + b"):
        assert text in out


# --- the Python API ----------------------------------------------------------------------


def test_python_api_takes_dicts_and_renders(cases):
    case = D.make_case(layout="rows")
    grads = RowStudent(read_case(cases["rows", "npz"]), "l2-factor").gradients()
    d = D.check(case, grads)
    assert isinstance(d, D.Diagnosis)
    assert d.verdict == "wrong" and d.likely[0]["bug"] == "l2-factor"
    assert {n for n, t in d.tensors.items() if t["status"] == "wrong"} == {"W1", "W2", "W3"}
    assert "l2-factor" in str(d) and "| tensor |" in d._repr_markdown_()
    path = str(cases["rows", "npz"])
    assert D.check(path, RowStudent(read_case(path)).gradients()).verdict == "correct"
