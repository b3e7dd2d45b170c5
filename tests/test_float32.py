"""float32 against float64: the study trains in float32, so float32 must compute what
float64 computes, to float32's precision.

For each architecture the same network is built in both precisions from the same seed
(the float32 parameters are the float64 ones, cast), and loss, cost, every gradient, the
eval-mode scores and accuracy, and a short SGD run are compared. Each comparison is a
function that raises AssertionError, and each is shown to fail on a planted bug: one
float32 weight matrix moved by ±1e-2 per entry.

Tolerances, with u = 2^-24 ≈ 6e-8 the unit roundoff of float32:
- loss and cost, rtol 1e-5: a forward pass through 4 layers of ≤ 16-term dot products,
  a normalization and a log-sum-exp loses a few hundred u at most; measured ≤ 1.2e-7,
  so 1e-5 leaves ~100× margin, while the planted bug moves the loss by ≥ 1e-4.
- gradients, relative error ≤ 1e-4 per tensor (klayer.nn.gradcheck.relative_error, floor
  1e-2): the backward pass doubles the chain of roundoffs and divides by the batch
  standard deviation; measured ≤ 7.4e-6 (~13× margin); the planted bug gives ≥ 1e-2.
- training (see TRAIN_TOL): after N steps the per-step errors have accumulated.
"""

from __future__ import annotations

import numpy as np
import pytest

from klayer.config import TrainConfig
from klayer.nn.gradcheck import relative_error
from klayer.nn.network import Network
from klayer.modelfile import read_model
from klayer.train import train

D, HIDDEN, C, N = 12, [16, 16, 16], 4, 40
LAM = 0.01
LOSS_RTOL = 1e-5
GRAD_TOL = 1e-4
# After TRAIN_STEPS SGD steps (η = 0.05, batches of 20): the parameters' relative error
# (same formula as the gradients) was ≤ 1.1e-5 over these architectures. Each step adds
# the update's float32 error (≤ η × the 1e-4 gradient bound) and carries the earlier
# ones along; over 100 steps of a smooth, non-chaotic descent that accumulates roughly
# linearly, so 1e-3 (= 100 steps × 1e-5) bounds it with ~100× margin over what we saw,
# and still sits 10× below the ≥ 1e-2 the planted bug leaves.
TRAIN_STEPS, TRAIN_ETA, TRAIN_BATCH = 100, 0.05, 20
TRAIN_TOL = 1e-3
# A float64 top-2 score margin below this may flip the float32 argmax honestly.
TIE_MARGIN = 1e-4

ARCHITECTURES = {
    "no normalization": dict(batch_norm=False),
    "batch norm before ReLU": dict(),
    "batch norm after ReLU": dict(norm_position="after"),
    "layer norm": dict(batch_norm=False, layer_norm=True),
    "residual": dict(residual=True),
    "dropout (fixed mask)": dict(dropout=0.3),
    "label smoothing": dict(label_smoothing=0.1),
}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D))
    y = rng.integers(0, C, N)
    return X, y


def pair(options: dict, seed: int = 3) -> tuple[Network, Network]:
    """The same network in float64 and float32 (built from the same seed)."""
    return (Network(D, HIDDEN, C, dtype="float64", seed=seed, **options),
            Network(D, HIDDEN, C, dtype="float32", seed=seed, **options))


def masks_for(net64: Network, n: int, rng) -> tuple[dict | None, dict | None]:
    """One dropout mask per hidden layer, for float64 and (cast) for float32."""
    masks = net64.dropout_masks(n, rng)
    if not masks:
        return None, None
    return masks, {l: m.astype(np.float32) for l, m in masks.items()}


def planted_bug(net32: Network) -> None:
    """Move every entry of W2 by ±1e-2 (random signs: a uniform shift would be removed by
    layer norm, which is not a bug)."""
    W = net32.params["W2"]
    W += np.float32(1e-2) * np.random.default_rng(7).choice([-1, 1], W.shape).astype(W.dtype)


# --- the comparisons ---------------------------------------------------------------------


def assert_loss_and_grads_agree(net64, net32, X, y, masks64=None, masks32=None):
    r64 = net64.loss(X, y, LAM, masks=masks64)
    r32 = net32.loss(X, y, LAM, masks=masks32)
    assert r64.loss == pytest.approx(r32.loss, rel=LOSS_RTOL, abs=0), "loss"
    assert r64.cost == pytest.approx(r32.cost, rel=LOSS_RTOL, abs=0), "cost"
    assert r32.grads.keys() == r64.grads.keys()
    errors = {k: relative_error(r32.grads[k], r64.grads[k]) for k in r64.grads}
    bad = {k: e for k, e in errors.items() if not e <= GRAD_TOL}
    assert not bad, f"gradients differ by more than {GRAD_TOL}: {bad}"
    return r64, r32


def assert_eval_agrees(net64, net32, X, y):
    """Scores, loss, cost and accuracy in eval mode (moving averages)."""
    s64, s32 = net64.scores(X), net32.scores(X)
    assert s32.dtype == np.float32
    scale = float(np.abs(s64).max())
    assert np.abs(s32 - s64).max() <= LOSS_RTOL * scale, "eval-mode scores"
    e64, e32 = net64.evaluate(X, y, LAM), net32.evaluate(X, y, LAM)
    assert e64["loss"] == pytest.approx(e32["loss"], rel=LOSS_RTOL, abs=0), "eval loss"
    assert e64["cost"] == pytest.approx(e32["cost"], rel=LOSS_RTOL, abs=0), "eval cost"
    top2 = np.sort(s64, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > TIE_MARGIN
    np.testing.assert_array_equal(s32[clear].argmax(1), s64[clear].argmax(1),
                                  err_msg="eval-mode predictions")
    assert abs(e64["accuracy"] - e32["accuracy"]) <= np.count_nonzero(~clear) / len(y)


def sgd_batches(net64, n: int) -> list:
    """TRAIN_STEPS random batches (indices, dropout masks drawn in float64)."""
    batch_rng, mask_rng = np.random.default_rng(5), np.random.default_rng(11)
    return [(batch_rng.choice(n, TRAIN_BATCH, replace=False),
             net64.dropout_masks(TRAIN_BATCH, mask_rng) or None) for _ in range(TRAIN_STEPS)]


def sgd_steps(net, X, y, batches) -> None:
    """Plain SGD, θ ← θ − η ∇J, over ``batches`` (masks cast to the network's dtype)."""
    eta = net.dtype.type(TRAIN_ETA)
    for idx, masks in batches:
        if masks is not None:
            masks = {l: m.astype(net.dtype) for l, m in masks.items()}
        res = net.loss(X[idx], y[idx], LAM, masks=masks)
        for k, g in res.grads.items():
            net.params[k] -= eta * g
        net.update_running_stats(res.batch_stats)


def assert_training_agrees(net64, net32, X, y):
    batches = sgd_batches(net64, len(X))  # the same batches and masks for both
    for net in (net64, net32):
        sgd_steps(net, X, y, batches)
    errors = {k: relative_error(net32.params[k], net64.params[k]) for k in net64.params}
    bad = {k: e for k, e in errors.items() if not e <= TRAIN_TOL}
    assert not bad, f"after {TRAIN_STEPS} steps the parameters differ: {bad}"
    for k in net64.buffers:
        assert relative_error(net32.buffers[k], net64.buffers[k]) <= TRAIN_TOL, k
    assert_eval_agrees(net64, net32, X, y)


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_float32_parameters_are_the_float64_ones_cast(options):
    net64, net32 = pair(options)
    assert net32.params.keys() == net64.params.keys()
    for k, p in net32.params.items():
        assert p.dtype == np.float32 and net64.params[k].dtype == np.float64, k
        np.testing.assert_array_equal(p, net64.params[k].astype(np.float32), err_msg=k)


@pytest.mark.parametrize("options", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_loss_cost_and_gradients_agree(options, batch):
    X, y = batch
    net64, net32 = pair(options)
    masks64, masks32 = masks_for(net64, N, np.random.default_rng(1))
    _, r32 = assert_loss_and_grads_agree(net64, net32, X, y, masks64, masks32)
    # and float32 stays float32 all the way (no silent float64 upcast)
    assert all(g.dtype == np.float32 for g in r32.grads.values())
    for mean, var in r32.batch_stats.values():
        assert mean.dtype == var.dtype == np.float32


@pytest.mark.parametrize("options", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_eval_mode_scores_and_accuracy_agree(options, batch):
    X, y = batch
    net64, net32 = pair(options)
    for net in (net64, net32):  # moving averages from one training batch
        net.update_running_stats(net.loss(X, y, LAM, grads=False).batch_stats)
    assert all(b.dtype == np.float32 for b in net32.buffers.values())
    assert_eval_agrees(net64, net32, X, y)


@pytest.mark.parametrize("options", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_sgd_training_stays_close(options, batch):
    X, y = batch
    net64, net32 = pair(options)
    assert_training_agrees(net64, net32, X, y)
    assert all(p.dtype == np.float32 for p in net32.params.values())


@pytest.mark.parametrize("options", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_each_comparison_catches_a_planted_bug(options, batch):
    """W2 moved by ±1e-2 in the float32 network: every comparison above must fail."""
    X, y = batch
    net64, net32 = pair(options)
    masks64, masks32 = masks_for(net64, N, np.random.default_rng(1))
    planted_bug(net32)
    with pytest.raises(AssertionError, match="loss"):
        assert_loss_and_grads_agree(net64, net32, X, y, masks64, masks32)

    # the gradient check alone (loss tolerance waived) also fails
    r64, r32 = net64.loss(X, y, LAM, masks=masks64), net32.loss(X, y, LAM, masks=masks32)
    assert max(relative_error(r32.grads[k], r64.grads[k]) for k in r64.grads) > GRAD_TOL

    for net in (net64, net32):
        net.update_running_stats(net.loss(X, y, LAM, grads=False).batch_stats)
    with pytest.raises(AssertionError):
        assert_eval_agrees(net64, net32, X, y)

    net64, net32 = pair(options)
    planted_bug(net32)
    with pytest.raises(AssertionError, match="parameters differ"):
        assert_training_agrees(net64, net32, X, y)


# --- end to end: klayer.train.train -------------------------------------------------------

# A 3-layer network, 40 steps of momentum SGD or Adam; on these 100-example splits one
# example is 0.01 of accuracy. Measured: float32 and float64 end with the same accuracies
# and their eval-mode validation losses agree to 1.3e-6 at every history point, so 1e-4
# leaves ~100x margin; two examples of slack on accuracy covers a near-tie flipping.
# No dropout here: the trainer draws float32 masks from float32 uniforms (a different
# stream from float64's), so the two precisions would not train the same network.
E2E = TrainConfig(hidden_sizes=(16, 12), n_s=10, cycles=2, batch_size=20, eta_max=0.1,
                  evals_per_cycle=4)
ACCURACY_MARGIN = 0.02
HISTORY_RTOL = 1e-4


@pytest.mark.parametrize("optimizer, batch_norm", [
    ("momentum", True),
    ("adam", False),
    # Adam with batch norm before the ReLU: the biases feeding batch norm have gradient
    # exactly 0 (Network.backward), not float32 rounding noise that Adam would amplify.
    ("adam", True),
])
def test_train_end_to_end_in_float32(data, tmp_path, optimizer, batch_norm):
    config = E2E.replace(optimizer=optimizer, batch_norm=batch_norm,
                         eta_max=0.1 if optimizer == "momentum" else 0.05)
    results = {dtype: train(config.replace(dtype=dtype), data, tmp_path / dtype)
               for dtype in ("float64", "float32")}
    r64, r32 = results["float64"], results["float32"]

    assert [row["step"] for row in r32.history] == [row["step"] for row in r64.history]
    assert len(r32.history) == len(r64.history) == config.cycles * config.evals_per_cycle + 1
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert abs(r32.final[key] - r64.final[key]) <= ACCURACY_MARGIN, key
    assert r64.final["val_accuracy"] > 0.5  # it learned: the comparison is not of two guesses
    for a, b in zip(r64.history, r32.history):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=HISTORY_RTOL)

    # everything float32 produced is float32: the network, and every float array in
    # every .npz of the run folder (model, checkpoints with the optimizer's state)
    assert all(p.dtype == np.float32 for p in r32.network.params.values())
    assert all(b.dtype == np.float32 for b in r32.network.buffers.values())
    run = tmp_path / "float32"
    npz_files = sorted(run.glob("*.npz"))
    assert {p.name for p in npz_files} >= {"model.npz", "checkpoint.npz",
                                           "checkpoint.prev.npz"}
    for path in npz_files:
        with np.load(path, allow_pickle=False) as arrays:
            floats = {k: arrays[k].dtype for k in arrays.files if arrays[k].dtype.kind == "f"}
        assert floats, path.name
        assert set(floats.values()) == {np.dtype(np.float32)}, (path.name, floats)
    with np.load(run / "checkpoint.npz", allow_pickle=False) as arrays:
        assert any(k.startswith("optim.") for k in arrays.files)  # its state was checked
    net, _, _ = read_model(run)
    assert net.dtype == np.float32
    assert all(a.dtype == np.float32 for a in (*net.params.values(), *net.buffers.values()))
    assert bool(net.buffers) == batch_norm
    assert TrainConfig.from_toml(run / "config.toml").dtype == "float32"
