"""Run files: model save/load round trip, clear errors for damaged files, checkpoints."""

import json
import os

import numpy as np
import pytest

from klayer import runs
from klayer import modelfile
from klayer.data import CLASS_NAMES, Standardizer
from klayer.nn.network import Network


@pytest.fixture
def saved(tmp_path):
    """A run folder with a small batch-norm model whose moving averages are set."""
    rng = np.random.default_rng(0)
    net = Network(12, [6, 5], batch_norm=True, dtype="float32", seed=3)
    X, y = rng.standard_normal((20, 12)), rng.integers(0, 10, 20)
    net.update_running_stats(net.loss(X, y, grads=False).batch_stats)
    standardizer = Standardizer(rng.random(12), rng.random(12) + 0.1)
    modelfile.save_model(tmp_path, net, standardizer, CLASS_NAMES)
    return tmp_path, net, standardizer


def _rewrite_npz(run_dir, change):
    """Replace model.npz with change(arrays) (the header keeps the old checksum)."""
    path = run_dir / runs.MODEL_FILE
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_header(run_dir, change):
    path = run_dir / runs.HEADER_FILE
    header = json.loads(path.read_text())
    change(header)
    path.write_text(json.dumps(header))


def test_round_trip(saved):
    run_dir, net, standardizer = saved
    for where in (run_dir, run_dir / runs.MODEL_FILE, run_dir / runs.HEADER_FILE):
        loaded, std, names = modelfile.read_model(where)
        assert loaded.hyperparameters() == net.hyperparameters()
        assert loaded.running_initialised
        for k in net.params:
            np.testing.assert_array_equal(loaded.params[k], net.params[k])
            assert loaded.params[k].dtype == np.float32
        for k in net.buffers:
            np.testing.assert_array_equal(loaded.buffers[k], net.buffers[k])
        np.testing.assert_array_equal(std.mean, standardizer.mean)
        np.testing.assert_array_equal(std.std, standardizer.std)
        assert names == list(CLASS_NAMES)
    X = np.random.default_rng(1).standard_normal((7, 12))
    np.testing.assert_array_equal(loaded.scores(X), net.scores(X))


def test_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no saved klayer model"):
        modelfile.read_model(tmp_path / "nowhere")
    run_dir = saved[0]
    (run_dir / runs.HEADER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.json not found"):
        modelfile.read_model(run_dir)


def test_truncated_npz(saved):
    run_dir = saved[0]
    path = run_dir / runs.MODEL_FILE
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="model.npz is truncated or not a NumPy .npz file"):
        modelfile.read_model(run_dir)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        modelfile.read_model(run_dir)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("W2"), r"missing \['W2'\]"),
    (lambda a: a.update(W9=np.zeros(3, np.float32)), r"unexpected \['W9'\]"),
    (lambda a: a.pop("running_mean1"), "moving averages do not match"),
    (lambda a: a.update(W1=np.zeros((6, 13), np.float32)), r"W1 has shape \(6, 13\) but"),
    (lambda a: a.update(W1=a["W1"].astype(np.float64)), "W1 has dtype float64 but"),
    (lambda a: a.update(b2=a["b2"].astype(np.int32)), "b2 has dtype int32"),
    (lambda a: a["gamma1"].__setitem__(0, np.nan), "gamma1 contains NaN or infinite"),
    (lambda a: a["W3"].__setitem__((0, 0), np.inf), "W3 contains NaN or infinite"),
    (lambda a: a["running_var2"].__setitem__(0, -1.0), "running_var2 has negative"),
    (lambda a: a["W1"].__setitem__((0, 0), 0.5), "does not match the checksum"),
    (lambda a: a.update(W1=np.array([{"evil": 1}], dtype=object)), "truncated or not a NumPy"),
])
def test_tampered_arrays(saved, change, message):
    run_dir = saved[0]
    _rewrite_npz(run_dir, change)
    with pytest.raises(ValueError, match=message):
        modelfile.read_model(run_dir)


@pytest.mark.parametrize("change, message", [
    (lambda h: h["architecture"].update(hidden_sizes=[6, 4]),
     r"W2 has shape \(5, 6\) but .* \(4, 6\)"),
    (lambda h: h["architecture"].update(batch_norm=False), "unexpected"),
    (lambda h: h["architecture"].update(dtype="float64"), "has dtype float32 but the header"),
    (lambda h: h["architecture"].update(hidden_sizes=[-1]), "invalid architecture"),
    (lambda h: h.update(format_version=99), "format 99"),
    (lambda h: h.pop("checksum"), "lacks"),
    (lambda h: h.update(format="something"), "not a klayer model header"),
    (lambda h: h.update(class_names=["cat"]), "one name per class"),
    (lambda h: h["standardizer"].update(mean=[0.0] * 5), "invalid standardizer"),
    (lambda h: h.update(standardizer={"mean": [0.0] * 5, "std": [1.0] * 5}), "5 dimensions"),
])
def test_tampered_header(saved, change, message):
    run_dir = saved[0]
    _edit_header(run_dir, change)
    with pytest.raises(ValueError, match=message):
        modelfile.read_model(run_dir)


def test_header_not_json(saved):
    run_dir = saved[0]
    (run_dir / runs.HEADER_FILE).write_text('{"format": "klayer-model", ')
    with pytest.raises(ValueError, match="model.json is not valid JSON"):
        modelfile.read_model(run_dir)


def test_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    rng.permutation(10)
    ckpt = runs.Checkpoint(
        step=40, epoch=2, params={"W1": rng.standard_normal((3, 2))},
        buffers={"running_mean1": np.ones(3)}, running_initialised=True,
        optimizer_state={"t": 7, "m.W1": np.zeros((3, 2))},
        rng_state=rng.bit_generator.state, histories=[[{"step": 0, "eta": 0.1 + 0.2}]],
        timings={"train_seconds": 1.5}, config_hash="abc",
    )
    runs.save_checkpoint(tmp_path, ckpt)
    assert os.listdir(tmp_path) == [runs.CHECKPOINT_FILE]  # no temporary file left
    back = runs.load_checkpoint(tmp_path)
    assert (back.step, back.epoch, back.running_initialised, back.config_hash) == \
        (40, 2, True, "abc")
    np.testing.assert_array_equal(back.params["W1"], ckpt.params["W1"])
    assert back.optimizer_state["t"] == 7 and back.histories == ckpt.histories
    restored = np.random.default_rng()
    restored.bit_generator.state = back.rng_state
    np.testing.assert_array_equal(restored.permutation(10), rng.permutation(10))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    runs.write_text(path, "old")

    def failing(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runs.atomic_write(path, failing)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_history_csv_round_trip(tmp_path):
    history = [{"step": s, "epoch": s / 3, "eta": 0.1 / 3, "train_loss": 2.302585092994046,
                "train_cost": 1 / 7, "train_accuracy": 0.1, "val_loss": 1e-300,
                "val_cost": 2.0, "val_accuracy": 0.5} for s in (0, 3)]
    runs.write_history(tmp_path / "h.csv", history)
    assert runs.read_history(tmp_path / "h.csv") == history


def test_figures(tmp_path):
    from klayer import plots

    counts = plots.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert plots.plot_confusion(counts, ["a", "b", "c"], tmp_path / "c.png").stat().st_size > 0
    history = [{"step": s, **{f"{split}_{q}": 1.0 / (s + 1) for split in ("train", "val")
                              for q in ("loss", "cost", "accuracy")}} for s in range(5)]
    path = plots.plot_history(history, tmp_path, title="run")
    assert path == tmp_path / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_comparison({"a": history, "b": history}, tmp_path / "ab.png").exists()


# --- the checksum covers the header; the header is checked before anything is built -------


@pytest.mark.parametrize("change", [
    lambda h: h["class_names"].reverse(),
    lambda h: h["class_names"].__setitem__(3, "kitten"),
    lambda h: h["standardizer"]["mean"].__setitem__(0, 0.5),
    lambda h: h["standardizer"]["std"].__setitem__(11, 2.0),
    lambda h: h["architecture"].update(bn_eps=1e-3),
    lambda h: h["architecture"].update(norm_position="after"),
    lambda h: h["architecture"].update(label_smoothing=0.1),
    lambda h: h.update(running_initialised=True, klayer_version="0.0.1"),
], ids=["class order", "class name", "mean", "std", "bn_eps", "norm_position",
        "label_smoothing", "version"])
def test_edited_header_is_refused(saved, change):
    run_dir = saved[0]
    _edit_header(run_dir, change)
    with pytest.raises(ValueError) as info:
        modelfile.read_model(run_dir)
    message = str(info.value)
    assert "\n" not in message and str(run_dir / runs.HEADER_FILE) in message
    assert "does not match the checksum" in message


def test_checksum_depends_on_every_header_field(saved):
    run_dir = saved[0]
    header = json.loads((run_dir / runs.HEADER_FILE).read_text())
    data = (run_dir / runs.MODEL_FILE).read_bytes()
    assert modelfile.model_checksum(data, header) == header["checksum"]
    assert modelfile.model_checksum(data, dict(reversed(header.items()))) == header["checksum"]
    assert modelfile.model_checksum(data + b"\0", header) != header["checksum"]
    for key in header:
        if key != "checksum":
            assert modelfile.model_checksum(data, {**header, key: "x"}) != header["checksum"], key


def test_old_format_is_refused_with_advice(saved):
    run_dir = saved[0]
    _edit_header(run_dir, lambda h: h.update(format_version=1))
    with pytest.raises(ValueError, match=r"model format 1, written by an older klayer.*"
                                         r"retrain the model or re-save it"):
        modelfile.read_model(run_dir)


@pytest.mark.parametrize("hidden, message", [
    ([200000, 5], r"W1 has shape \(6, 12\) but the architecture in the header needs "
                  r"\(200000, 12\)"),
    ([100000, 100000], "declares 10003200010 parameters, more than klayer loads"),
    ([6, 5, 7], r"missing \['W4', 'b4'"),
])
def test_header_checked_against_stored_shapes_before_building(saved, monkeypatch, hidden,
                                                              message):
    run_dir = saved[0]
    _edit_header(run_dir, lambda h: h["architecture"].update(hidden_sizes=hidden))

    def no_network(*args, **kwargs):
        raise AssertionError("a network was built before the header was checked")

    monkeypatch.setattr(Network, "__init__", no_network)
    with pytest.raises(ValueError, match=message):
        modelfile.read_model(run_dir)


def test_npz_shapes_read_without_loading(saved):
    run_dir, net, _ = saved
    data = (run_dir / runs.MODEL_FILE).read_bytes()
    shapes = modelfile._npz_headers(data, run_dir / runs.MODEL_FILE)
    assert shapes == {k: (v.shape, v.dtype) for k, v in {**net.params, **net.buffers}.items()}
