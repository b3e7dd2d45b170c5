"""The training loop: history, one shared forward pass, divergence guard, exact resume."""

from types import SimpleNamespace

import numpy as np
import pytest

from klayer import runs
from klayer import modelfile
from klayer.nn import gradcheck
from klayer.nn import layers
from klayer.config import TrainConfig
from klayer.nn.network import Network
from klayer.train import DivergenceError, TrainEvent, train

SMALL = TrainConfig(dtype="float64", hidden_sizes=(16, 12), n_s=10, cycles=2, batch_size=20, eta_max=1.0,
                    evals_per_cycle=4, subset=None)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """Drawing is tested with the command line; here it would only cost time."""
    monkeypatch.setattr("klayer.plots.plot_history", lambda *args, **kwargs: None)


def _assert_same_state(a: Network, b: Network):
    assert a.params.keys() == b.params.keys() and a.buffers.keys() == b.buffers.keys()
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.buffers:
        np.testing.assert_array_equal(a.buffers[k], b.buffers[k], err_msg=k)


def test_learns_and_records_history(data):
    events = []
    result = train(SMALL, data, callbacks=[events.append])
    steps_per_epoch = 200 // 20
    assert [row["step"] for row in result.history] == SMALL.eval_steps()
    assert len(result.history) == SMALL.cycles * SMALL.evals_per_cycle + 1
    for row in result.history:
        assert set(row) == set(runs.HISTORY_FIELDS)
        assert row["epoch"] == row["step"] / steps_per_epoch
        assert row["eta"] == pytest.approx(SMALL.eta_min + (SMALL.eta_max - SMALL.eta_min)
                                           * (1 - abs(row["step"] % 20 - 10) / 10))
        assert row["train_cost"] > row["train_loss"]  # λ Σ ||W||² > 0
    assert result.history[0]["val_accuracy"] < 0.5 < result.final["val_accuracy"]
    assert {"train_accuracy", "val_loss", "test_accuracy", "test_cost"} <= set(result.final)
    best = max(result.history, key=lambda r: r["val_accuracy"])
    assert (result.best_val_accuracy, result.best_step, result.best_epoch) == \
        (best["val_accuracy"], best["step"], best["epoch"])
    assert result.steps == 40 and result.epochs == 4.0
    assert [e.record for e in events if e.kind == "eval"] == result.history
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 41))
    assert [e.step for e in events if e.kind == "epoch"] == [10, 20, 30, 40]
    assert set(result.summary()) >= {"final", "best_val_accuracy", "timings", "config_hash"}


def test_moving_averages_updated_after_every_step(data, monkeypatch):
    seen = []
    original = Network.update_running_stats

    def spy(self, batch_stats):
        seen.append(sorted(batch_stats))
        original(self, batch_stats)

    monkeypatch.setattr(Network, "update_running_stats", spy)
    result = train(SMALL, data)
    # one per update, plus the step-0 history point, which is then forgotten
    assert len(seen) == SMALL.total_steps + 1 and seen[-1] == [1, 2]
    assert result.network.running_initialised


def test_one_forward_pass_for_training_evaluation_and_gradcheck(data, monkeypatch):
    """Training, evaluation and the gradient check all go through Network.forward and
    the layer functions it calls; there is no second implementation of the model."""
    calls = []
    forward, affine = Network.forward, layers.affine_forward

    def spy_forward(self, X, mode="train", check=True, masks=None):
        calls.append(("forward", mode))
        return forward(self, X, mode, check, masks)

    def spy_affine(x, W, b):
        calls.append(("affine", None))
        return affine(x, W, b)

    monkeypatch.setattr(Network, "forward", spy_forward)
    monkeypatch.setattr(layers, "affine_forward", spy_affine)
    config = SMALL.replace(cycles=1, n_s=5)

    result = train(config, data)
    modes = [m for kind, m in calls if kind == "forward"]
    assert modes.count("train") == config.total_steps + 1  # + the step-0 statistics
    assert modes.count("eval") > 0  # the history and final metrics
    assert calls.count(("affine", None)) == 3 * len(modes)  # 3 layers per forward pass

    calls.clear()
    result.network.evaluate(data.X_val, data.y_val)
    assert calls and {m for kind, m in calls if kind == "forward"} == {"eval"}

    calls.clear()
    net = Network(5, [4], batch_norm=True, seed=1)
    X, y = gradcheck.random_problem(5, 6)
    rows = gradcheck.check_gradients(net, X, y, lam=0.01)
    n_entries = sum(p.size for p in net.params.values())
    assert [c for c in calls if c[0] == "forward"] == [("forward", "train")] * (1 + 2 * n_entries)
    assert all(row.passed for row in rows)


def test_constant_schedule_and_float32(data):
    result = train(SMALL.replace(schedule="constant", eta_max=0.05, dtype="float32"), data)
    assert {row["eta"] for row in result.history} == {0.05}
    assert all(p.dtype == np.float32 for p in result.network.params.values())


def test_divergence_guard_keeps_last_good_checkpoint(data, tmp_path):
    config = SMALL.replace(eta_max=1e4, n_s=50, cycles=1)
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError) as info:
        train(config, data, run_dir)
    error = info.value
    message = str(error)
    assert isinstance(error, ValueError)
    assert f"update step {error.step}" in message and f"η = {error.eta:.4g}" in message
    names = [*Network(20, [16, 12]).params, "running_mean1", "running_var1", "running_mean2",
             "running_var2"]
    assert error.parameter in names and f"first non-finite parameter: {error.parameter}" in message
    ckpt = runs.load_checkpoint(run_dir)
    assert f"last good checkpoint (step {ckpt.step})" in message
    assert 0 < ckpt.step < error.step and ckpt.step % 10 == 0
    assert all(np.isfinite(p).all() for p in ckpt.params.values())
    net = Network(20, [16, 12])
    modelfile.restore_network(net, ckpt.params, ckpt.buffers, ckpt.running_initialised, "ckpt")


def _interrupt_after_epoch(epoch):
    def callback(event: TrainEvent):
        if event.kind == "epoch" and event.epoch == epoch:
            raise KeyboardInterrupt

    return callback


def _check_resume_is_exact(config, data, tmp_path, stop_epoch):
    straight = train(config, data, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(config, data, tmp_path / "resumed", callbacks=[_interrupt_after_epoch(stop_epoch)])
    assert runs.load_checkpoint(tmp_path / "resumed").epoch == stop_epoch
    resumed = train(config, data, tmp_path / "resumed", resume=True)
    _assert_same_state(resumed.network, straight.network)
    assert resumed.history == straight.history
    assert resumed.final == straight.final
    return straight


def test_resume_is_bit_identical(data, tmp_path):
    straight = _check_resume_is_exact(SMALL, data, tmp_path, stop_epoch=2)
    # resuming a finished run changes nothing: not its results, not a byte of its files
    run = tmp_path / "straight"
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()
             if p.name != runs.LOCK_FILE}
    assert {runs.MODEL_FILE, runs.HEADER_FILE, runs.SUMMARY_FILE, runs.HISTORY_FILE,
            runs.CHECKPOINT_FILE} <= set(files)
    again = train(SMALL, data, run, resume=True)
    assert again.history == straight.history and again.final == straight.final
    _assert_same_state(again.network, straight.network)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()
            if p.name != runs.LOCK_FILE} == files


def test_run_folder_guards(data, tmp_path):
    train(SMALL.replace(cycles=1), data, tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        train(SMALL.replace(cycles=1), data, tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        train(SMALL.replace(cycles=1, lam=0.1), data, tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="not a klayer run folder"):
        train(SMALL, data, tmp_path / "empty", resume=True)


def test_bad_data(data):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(SMALL.replace(batch_size=500), data)
    bad = SimpleNamespace(**{**vars(data), "y_val": data.y_val + 10})
    with pytest.raises(ValueError, match=r"y_val must lie in \[0, 10\)"):
        train(SMALL, bad)
    bad = SimpleNamespace(**{**vars(data), "X_train": np.full((200, 20), np.nan)})
    with pytest.raises(ValueError, match="X_train contains NaN"):
        train(SMALL, bad)


# --- real CIFAR-10 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_subset(cifar_dir):
    from klayer.data import load_cifar10

    return load_cifar10(cifar_dir, subset=2000, dtype="float64")


@pytest.mark.cifar
def test_resume_is_bit_identical_on_cifar10(cifar_subset, tmp_path):
    config = TrainConfig(hidden_sizes=(50, 50), n_s=50, cycles=1, evals_per_cycle=4,
                         subset=2000, dtype="float64")
    straight = _check_resume_is_exact(config, cifar_subset, tmp_path, stop_epoch=1)
    assert straight.steps == 100 and straight.epochs == 5


@pytest.mark.cifar
@pytest.mark.slow
def test_short_cifar10_run_beats_35_percent(cifar_dir):
    from klayer.data import load_cifar10

    data = load_cifar10(cifar_dir, dtype="float32")
    config = TrainConfig(n_s=200, cycles=1, evals_per_cycle=1, dtype="float32")  # 400 steps
    result = train(config, data)
    assert result.final["val_accuracy"] > 0.35
    assert result.final["test_accuracy"] > 0.35


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_resume_is_bit_identical_with_stateful_optimizers(data, tmp_path, optimizer):
    eta = 0.05 if optimizer == "momentum" else 1e-2
    config = SMALL.replace(optimizer=optimizer, eta_max=eta)
    straight = _check_resume_is_exact(config, data, tmp_path, stop_epoch=2)
    assert straight.final["train_accuracy"] > 0.5  # it learns (4 classes: chance is 0.25)


# --- dropout and augmentation ----------------------------------------------------------------


@pytest.mark.parametrize("option", [{"flip": True}, {"translate": 2}, {"jitter": 0.1}])
def test_augmentation_needs_image_rows(data, option):
    with pytest.raises(ValueError, match=r"augmentation needs CIFAR-10 images \(3072 "
                                         r"values per row\).*20 columns"):
        train(SMALL.replace(dropout=0.2, **option), data)


@pytest.fixture(scope="module")
def image_data():
    """Generated rows of CIFAR-10 width (3072): 100/40 split, four classes decided by the
    mean of the red channel's left half and of the green channel's top half."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((140, 3072))
    images = X.reshape(-1, 3, 32, 32)
    y = (images[:, 0, :, :16].mean(axis=(1, 2)) > 0).astype(np.int64) \
        + 2 * (images[:, 1, :16].mean(axis=(1, 2)) > 0)
    return SimpleNamespace(X_train=X[:100], y_train=y[:100], X_val=X[100:], y_val=y[100:])


def test_resume_is_bit_identical_with_dropout(data, tmp_path):
    config = SMALL.replace(dropout=0.2)
    straight = _check_resume_is_exact(config, data, tmp_path, stop_epoch=2)
    plain = train(SMALL, data)  # dropout changes the run (masks drawn every step)
    assert not np.array_equal(plain.network.params["W1"], straight.network.params["W1"])


def test_resume_is_bit_identical_with_dropout_and_augmentation(image_data, tmp_path):
    config = TrainConfig(hidden_sizes=(8, 6), n_s=5, cycles=2, batch_size=20, eta_max=0.2,
                         evals_per_cycle=2, dropout=0.2, flip=True, translate=2)
    straight = _check_resume_is_exact(config, image_data, tmp_path, stop_epoch=2)
    assert straight.steps == 20 and straight.epochs == 4.0
    # the augmentation changes the run, and draws from its own generator: dropout
    # masks and shuffling do not depend on it, so turning it off changes only the inputs
    no_aug = train(config.replace(flip=False, translate=0), image_data)
    assert not np.array_equal(no_aug.network.params["W1"], straight.network.params["W1"])


# --- exact resume across schedules, augmentation, PreciseBN and precisions ---------------------


@pytest.mark.parametrize("options", [
    {"schedule": "step", "eta_max": 0.5, "decay_rate": 0.5, "decay_every": 7},
    {"schedule": "cosine", "eta_max": 0.5},
    {"schedule": "cosine", "eta_max": 0.5, "warmup_steps": 13},
    {"schedule": "constant", "eta_max": 0.2, "warmup_steps": 5},
    {"precise_bn": 3},
    {"optimizer": "adam", "eta_max": 1e-2, "dropout": 0.3, "dtype": "float32"},
    {"optimizer": "momentum", "eta_max": 0.05, "dtype": "float32", "label_smoothing": 0.1},
], ids=["step", "cosine", "cosine-warmup", "constant-warmup", "precise-bn",
        "adam-dropout-float32", "momentum-float32"])
def test_resume_is_bit_identical_with(data, tmp_path, options):
    straight = _check_resume_is_exact(SMALL.replace(**options), data, tmp_path, stop_epoch=3)
    if "precise_bn" in options:  # the statistics were recomputed: the results differ
        assert straight.final_moving_average is not None
        assert straight.final_moving_average != straight.final


def test_resume_is_bit_identical_with_jitter(image_data, tmp_path):
    config = TrainConfig(hidden_sizes=(8, 6), n_s=5, cycles=2, batch_size=20, eta_max=0.2,
                         evals_per_cycle=2, jitter=0.2, dtype="float32", precise_bn=2)
    straight = _check_resume_is_exact(config, image_data, tmp_path, stop_epoch=1)
    no_jitter = train(config.replace(jitter=0.0), image_data)
    assert not np.array_equal(no_jitter.network.params["W1"], straight.network.params["W1"])


# --- levers: mixing, weight averaging, whitening, flip averaging ------------------------------


@pytest.fixture(scope="module")
def image_data_with_test(image_data):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 3072))
    y = rng.integers(0, 4, 30)
    return SimpleNamespace(**vars(image_data), X_test=X, y_test=y)


def test_resume_is_bit_identical_with_mixing_and_ema(image_data_with_test, tmp_path):
    from klayer.levers.tta import flip_average_accuracy

    config = TrainConfig(hidden_sizes=(8, 6), n_s=5, cycles=2, batch_size=20, eta_max=0.2,
                         evals_per_cycle=2, dropout=0.2, flip=True, translate=2,
                         pad_mode="reflect", mixup=0.4, cutmix=1.0, ema=0.9)
    straight = _check_resume_is_exact(config, image_data_with_test, tmp_path, stop_epoch=2)
    ckpt = runs.load_checkpoint(tmp_path / "resumed")
    assert ckpt.ema_state["step"] == 20 and "mix" in ckpt.rng_states
    # the averaged weights are the final network; the plain ones are reported beside them
    plain = straight.final_without_ema
    assert plain is not None and plain != straight.final
    summary = runs.read_summary(tmp_path / "straight")
    assert summary["final_without_ema"] == plain and summary["final"] == straight.final
    net = straight.network
    assert straight.final["test_accuracy"] == net.evaluate(
        image_data_with_test.X_test, image_data_with_test.y_test)["accuracy"]
    assert straight.final["test_accuracy_tta"] == flip_average_accuracy(
        net, image_data_with_test.X_test, image_data_with_test.y_test)
    assert "test_accuracy_tta" in plain
    # each lever changes the run
    for off in ({"mixup": 0.0, "cutmix": 0.0}, {"pad_mode": "mean"}):
        other = train(config.replace(**off), image_data_with_test)
        assert not np.array_equal(other.network.params["W1"], net.params["W1"]), off
    # without ema: the same weights as the plain ones of the ema run
    no_ema = train(config.replace(ema=0.0), image_data_with_test)
    assert no_ema.final == plain and no_ema.final_without_ema is None


def test_history_points_change_no_step_of_training(image_data_with_test):
    """Evaluating the history draws from no generator and touches no parameter or moving
    average: a run with 2 history points a cycle ends with the same network, to the bit,
    as one with 5, with dropout, augmentation, MixUp and the weight average on."""
    config = TrainConfig(hidden_sizes=(8, 6), n_s=5, cycles=2, batch_size=20, eta_max=0.2,
                         evals_per_cycle=2, dropout=0.2, flip=True, translate=2,
                         pad_mode="reflect", mixup=0.4, ema=0.9)
    few = train(config, image_data_with_test)
    many = train(config.replace(evals_per_cycle=5), image_data_with_test)
    assert len(many.history) > len(few.history)
    _assert_same_state(few.network, many.network)
    assert few.final == many.final and few.final_without_ema == many.final_without_ema


@pytest.mark.parametrize("option", [{"mixup": 0.2}, {"cutmix": 1.0}])
def test_mixing_needs_image_rows(data, option):
    with pytest.raises(ValueError, match=r"mixup and cutmix mix CIFAR-10 images.*20 columns"):
        train(SMALL.replace(**option), data)


@pytest.mark.parametrize("options", [{"whiten": "zca"},
                                     {"whiten": "pca", "whiten_components": 12, "ema": 0.8}])
def test_whitening_is_cached_folded_and_resumed_exactly(data, tmp_path, options):
    config = SMALL.replace(**options)
    straight = _check_resume_is_exact(config, data, tmp_path, stop_epoch=2)
    run = tmp_path / "straight"
    assert (run / runs.WHITENING_FILE).exists()
    # the saved model takes the standardised rows: the whitening is in its first layer
    net, _, _ = modelfile.read_model(run)
    assert net.input_size == 20 and net.params["W1"].shape == (16, 20)
    for split in ("val", "test"):
        X, y = getattr(data, f"X_{split}"), getattr(data, f"y_{split}")
        assert net.evaluate(X, y)["accuracy"] == straight.final[f"{split}_accuracy"]
        assert net.evaluate(X, y)["loss"] == pytest.approx(straight.final[f"{split}_loss"],
                                                            rel=1e-9)
    header = (run / runs.HEADER_FILE).read_text()
    assert '"folded_whitening"' in header and f'"{options["whiten"]}"' in header
    # the stored whitening is what a resumed run uses; one that does not match is refused
    from klayer.levers.whiten import Whitening

    other = Whitening.fit(data.X_train, "zca", 0.5)
    arrays, meta = other.to_arrays()
    runs.write_npz(tmp_path / "resumed" / runs.WHITENING_FILE,
                   {**arrays, "meta": np.array(__import__("json").dumps(meta))})
    with pytest.raises(ValueError, match="holds another whitening than config.toml"):
        train(config, data, tmp_path / "resumed", resume=True)


def test_whiten_components_beyond_the_row_are_refused(data):
    with pytest.raises(ValueError, match=r"whiten_components \(30\) must not exceed the 20"):
        train(SMALL.replace(whiten="pca", whiten_components=30), data)


@pytest.mark.slow
@pytest.mark.cifar
def test_lever_flags_train_and_evaluate_with_tta(cifar_dir, tmp_path, capsys):
    """The lever flags reach the run; the saved model has the whitening folded in, so
    ``klayer evaluate`` reproduces summary.json's accuracies, with --tta on its own line."""
    import json

    from klayer.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "1000", "--hidden", "20",
                 "--n-s", "20", "--cycles", "1", "--batch-size", "50", "--dtype", "float64",
                 "--flip", "--translate", "2", "--pad-mode", "edge", "--mixup", "0.2",
                 "--cutmix", "1.0", "--whiten", "pca", "--whiten-components", "64",
                 "--whiten-eps", "0.1", "--ema", "0.9", "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "plain weights: test accuracy" in out and "test-time flip averaging" in out
    config = runs.read_config(run)
    assert (config.pad_mode, config.mixup, config.cutmix, config.whiten,
            config.whiten_components, config.whiten_eps, config.ema) == \
        ("edge", 0.2, 1.0, "pca", 64, 0.1, 0.9)
    summary = runs.read_summary(run)
    final = summary["final"]
    assert "test_accuracy_tta" in final and "test_accuracy" in summary["final_without_ema"]
    header = json.loads((run / runs.HEADER_FILE).read_text())
    assert header["folded_whitening"] == {"method": "pca", "eps": 0.1, "components": 64}
    assert header["architecture"]["input_size"] == 3072
    assert main(["evaluate", str(run), "--tta"]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {final['test_accuracy']:.2%} on 1000 images" in out
    assert f"flip averaging (TTA, two forward passes): {final['test_accuracy_tta']:.2%}" in out
    assert "recomputed for the averaged weights over 50 batches" in out
