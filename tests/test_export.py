"""``klayer.load_model``, the ONNX and PyTorch exports and ``klayer export``, against the
real runtimes (onnxruntime, PyTorch) on real CIFAR-10 test images."""

import json
import re

import numpy as np
import pytest

import klayer
from klayer import data as D
from klayer import export, runs
from klayer import modelfile
from klayer.cli import main
from klayer.model import LoadedModel, to_planes
from klayer.nn.network import Network

from conftest import REPO_ROOT, onnx_or_skip, torch_or_skip

TOLERANCE = 1e-5  # largest |p_export - p_klayer| allowed, float32 graphs

# Every network option the exports must express.
OPTIONS = {
    "bn_before": {},
    "bn_after": {"norm_position": "after"},
    "layer_norm": {"batch_norm": False, "layer_norm": True},
    "layer_norm_after": {"batch_norm": False, "layer_norm": True, "norm_position": "after"},
    "residual": {"residual": True},
    "residual_bn_after": {"residual": True, "norm_position": "after"},
    "dropout": {"dropout": 0.3},
    "no_normalization": {"batch_norm": False},
    "no_hidden_layer": {"hidden": [], "batch_norm": False},
}


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    """A Standardizer fitted on 5,000 real training images; 1,000 real test images
    (raw uint8 pixels) with their labels."""
    files = D.batch_files(cifar_dir)
    X_train, _ = D.read_batch(files["data_batch_1"])
    X_test, y_test = D.read_batch(files[D.TEST_BATCH])
    return D.Standardizer.fit(X_train[:5000]), X_train[:2000], X_test[:1000], y_test[:1000]


def random_model(cifar, dtype, hidden=(40, 40, 30), seed=1, **options) -> LoadedModel:
    """A network with random weights, non-trivial γ, β, b and moving averages (two
    train-mode batches of real standardised images)."""
    standardizer, X_train, _, _ = cifar
    net = Network(3072, list(hidden), 10, dtype=dtype, seed=seed, **options)
    rng = np.random.default_rng(seed)
    for name, value in net.params.items():
        if name.startswith(("gamma", "beta", "b")):
            value += rng.normal(0, 0.3, value.shape).astype(net.dtype)
    for batch in np.split(standardizer.transform(X_train[:1000], dtype), 2):
        if net.batch_norm:
            net.update_running_stats(net.forward(batch, "train").batch_stats)
    return LoadedModel(net, standardizer, list(D.CLASS_NAMES))


def run_onnx(proto, pixels):
    _, ort = onnx_or_skip()
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": pixels})[0]


def readme_snippet(marker: str) -> str:
    """The python code block of docs/export.md (using a trained model elsewhere) that
    contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "docs" / "export.md").read_text(),
                        re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one docs/export.md python block with {marker!r}"
    return found[0]


def torch_sequential(architecture):
    """docs/export.md's own ``klayer_sequential`` (its definitions only, not its use)."""
    torch_or_skip()
    code = readme_snippet("def klayer_sequential")
    namespace = {}
    exec(code[:code.index("\nwith open(")], namespace)
    return namespace["klayer_sequential"](architecture)


def run_torch(model: LoadedModel, pixels):
    torch = torch_or_skip()
    net = model.network
    sequential = torch_sequential(net.hyperparameters())
    state = {k: torch.from_numpy(v) for k, v in
             export.torch_state_dict(net, model.standardizer).items()}
    sequential.load_state_dict(state)  # strict: every key and shape must match
    sequential.eval()
    with torch.no_grad():
        return sequential(torch.as_tensor(pixels, dtype=torch.float32)).numpy()


def assert_same_predictions(got, expected):
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


# --- the exports, every option, both dtypes ------------------------------------------------


@pytest.mark.cifar
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_onnx_and_torch_match_klayer(option, dtype, cifar):
    options = dict(OPTIONS[option])
    model = random_model(cifar, dtype, hidden=options.pop("hidden", (40, 40, 30)), **options)
    pixels = cifar[2]
    expected = model.predict_proba(pixels)
    assert np.ptp(expected.argmax(axis=1)) > 0  # not one class for every image

    proto = export.onnx_model(model.network, model.standardizer, model.class_names)
    assert_same_predictions(run_onnx(proto, pixels.astype(np.float32)), expected)
    hwc = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (n, 32, 32, 3) uint8
    proto = export.onnx_model(model.network, model.standardizer, model.class_names,
                              input_layout="hwc", input_dtype="uint8")
    assert_same_predictions(run_onnx(proto, hwc), expected)

    assert_same_predictions(run_torch(model, pixels), expected)


@pytest.mark.cifar
def test_onnx_graph_is_checked_and_carries_its_metadata(cifar):
    onnx, _ = onnx_or_skip()
    model = random_model(cifar, "float32", residual=True, norm_position="after")
    proto = export.onnx_model(model.network, model.standardizer, model.class_names,
                              config_hash="0123456789abcdef")
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == list(D.CLASS_NAMES)
    assert meta["klayer_version"] == klayer.__version__
    assert meta["config_hash"] == "0123456789abcdef"
    assert json.loads(meta["architecture"]) == model.network.hyperparameters()
    assert proto.opset_import[0].version == export.OPSET
    ops = [node.op_type for node in proto.graph.node]
    # bn after the ReLU and the residual Add are not folded: they stay as ops
    assert ops.count("Gemm") == 4 and ops.count("Add") >= 2 and "Mul" in ops
    assert ops[-1] == "Softmax" and "Dropout" not in ops


def test_unexportable_models_are_refused():
    net = Network(12, [5], 3)
    standardizer = D.Standardizer(np.zeros(12), np.ones(12))
    with pytest.raises(ValueError, match="no moving averages"):
        export.torch_state_dict(net, standardizer)
    with pytest.raises(ValueError, match="no standardisation statistics"):
        export.onnx_model(net, None, ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 dimensions but the network takes 12"):
        export.torch_state_dict(net, D.Standardizer(np.zeros(3), np.ones(3)))


def test_torch_layout_lists_the_modules_in_the_networks_order():
    net = Network(6, [4, 4], 3, residual=True, norm_position="after")
    assert export.torch_layout(net) == [
        ("linear", 1), ("relu", 1), ("batchnorm", 1), ("residual", 2), ("relu", 2),
        ("batchnorm", 2), ("linear", 3), ("softmax", 3)]
    assert export.torch_layout(Network(6, [], 3)) == [("linear", 1), ("softmax", 1)]


# --- klayer.load_model -------------------------------------------------------------------


@pytest.mark.cifar
def test_loaded_model_takes_raw_pixels_in_both_layouts(cifar):
    model = random_model(cifar, "float64")
    pixels = cifar[2][:50]
    hwc = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_planes(hwc), pixels)
    probs = model.predict_proba(pixels)
    np.testing.assert_allclose(probs.sum(axis=1), 1)
    np.testing.assert_allclose(model.predict_proba(hwc), probs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.predict_proba(pixels.astype(np.float32)), probs,
                               rtol=0, atol=1e-12)
    net = model.network
    np.testing.assert_array_equal(model.predict(hwc),
                                  net.predict(model.standardizer.transform(pixels, net.dtype)))
    with pytest.raises(ValueError, match=r"raw values in \[0, 255\]"):
        model.predict_proba(model.standardizer.transform(pixels))
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
        model.predict_proba(hwc[:, :, :, :2])


def test_load_model_refuses_a_model_without_standardisation(tmp_path):
    net = Network(12, [5], 3, batch_norm=False)
    modelfile.save_model(tmp_path, net)
    with pytest.raises(ValueError, match="no standardisation statistics"):
        klayer.load_model(tmp_path)
    assert main(["export", str(tmp_path)]) == 2


# --- a real trained run through the command line -------------------------------------------


@pytest.fixture(scope="module")
def trained_run(cifar_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "runs" / "best"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "1000", "--hidden", "30,30",
                 "--residual", "--n-s", "40", "--cycles", "1", "--batch-size", "50",
                 "--dtype", "float32", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.cifar
def test_exported_trained_run_matches_klayer(trained_run, cifar, capsys):
    _, ort = onnx_or_skip()
    torch = torch_or_skip()
    run = trained_run
    assert main(["export", str(run)]) == 0
    assert main(["export", str(run), "--format", "torch"]) == 0
    assert main(["export", str(run), "--input-layout", "hwc", "--input-dtype", "uint8",
                 "--out", str(run / "hwc.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'model.onnx'}" in out and f"wrote {run / 'model.pt'}" in out
    assert (run / "MODEL.md").is_file()

    pixels, labels = cifar[2], cifar[3]
    model = klayer.load_model(run)
    expected = model.predict_proba(pixels)
    assert np.mean(expected.argmax(axis=1) == labels) > 0.2  # it learnt something

    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert_same_predictions(session.run(None, {"pixels": pixels.astype(np.float32)})[0],
                            expected)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["config_hash"] == runs.read_config(run).config_hash()
    assert json.loads(meta["class_names"]) == list(D.CLASS_NAMES)
    session = ort.InferenceSession(str(run / "hwc.onnx"), providers=["CPUExecutionProvider"])
    hwc = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert_same_predictions(session.run(None, {"pixels": hwc})[0], expected)

    # docs/export.md's line for (n, 32, 32, 3) images given to the PyTorch model
    assert torch.equal(torch.as_tensor(hwc).permute(0, 3, 1, 2).flatten(1),
                       torch.as_tensor(pixels))
    state = torch.load(run / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    sequential = torch_sequential(model.network.hyperparameters())
    sequential.load_state_dict(state)
    sequential.eval()
    with torch.no_grad():
        assert_same_predictions(sequential(torch.as_tensor(pixels, dtype=torch.float32))
                                .numpy(), expected)


@pytest.mark.cifar
def test_readme_snippets_run_as_written(trained_run, cifar, monkeypatch):
    """docs/export.md's Python API, onnxruntime and PyTorch snippets, run on runs/best."""
    onnx_or_skip()
    torch_or_skip()
    run = trained_run
    assert main(["export", str(run)]) == 0 and main(["export", str(run), "--format",
                                                     "torch"]) == 0
    monkeypatch.chdir(run.parent.parent)  # the snippets name runs/best
    pixels = cifar[2][:100]
    expected = klayer.load_model(run).predict_proba(pixels)
    for marker in ("klayer.load_model", "ort.InferenceSession", "def klayer_sequential"):
        namespace = {"pixels": pixels}
        exec(readme_snippet(marker), namespace)
        got = namespace["probs"]
        got = got.numpy() if hasattr(got, "numpy") else got
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


def test_export_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    standardizer = D.Standardizer.fit(rng.integers(0, 256, (50, 3072), dtype=np.uint8))
    modelfile.save_model(run, Network(3072, [8], 10, batch_norm=False), standardizer)
    cases = [
        (["export", str(run), "--format", "torch", "--input-layout", "hwc"],
         "--input-layout and --input-dtype apply to --format onnx"),
        (["export", str(run), "--out", str(tmp_path / "nowhere" / "m.onnx")],
         "does not exist"),
        (["export", str(tmp_path / "missing")], "not found"),
        (["export", str(run), "--out", str(tmp_path)], "is a folder"),
    ]
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # as if not installed
    cases.append((["export", str(run)], 'pip install "klayer[onnx]"'))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("klayer export: error: ") and message in err
        assert err.count("\n") == 1
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert main(["export", str(run), "--format", "torch"]) == 2
    assert "pip install torch==2.13.0" in capsys.readouterr().err
