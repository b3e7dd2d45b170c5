"""``klayer train``, ``evaluate`` and ``predict`` from the command line."""

import numpy as np
import pytest

from klayer import runs
from klayer import modelfile
from klayer.cli import build_parser, main
from klayer.commands.train import resolve_config


def test_help_lists_the_flags(capsys, monkeypatch):
    import dataclasses

    from klayer.config import TrainConfig, flag_name

    monkeypatch.setenv("COLUMNS", "2000")  # no help text wrapped (nor hyphenated)
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text rewrapped on one line
    for flag in ("--config", "--no-batch-norm", "--name", "--resume", "--quiet"):
        assert flag in out
    assert main(["search", "--help"]) == 0
    search_out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):  # every option, with its help text
        assert f"{flag_name(f.name)} " in out and f.metadata["help"] in out, f.name
        if f.name not in ("batch_norm", "out"):
            assert f.metadata["help"] in search_out, f.name


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('hidden_sizes = [30]\nlam = 0.01\nn_s = 100\ninit = "xavier"\n')
    args = build_parser().parse_args([
        "train", "--config", str(path), "--lambda", "0.02", "--hidden", "20,10",
        "--no-batch-norm", "--init", "0.001", "--out", str(tmp_path / "run")])
    config, run_dir = resolve_config(args)
    assert (config.lam, config.n_s, config.hidden_sizes, config.batch_norm, config.init) == \
        (0.02, 100, (20, 10), False, 0.001)
    assert run_dir == tmp_path / "run" and config.out == str(run_dir)
    config, run_dir = resolve_config(build_parser().parse_args(["train", "--config", str(path)]))
    assert config.lam == 0.01 and run_dir.parent.name == "runs" and run_dir.name.startswith("exp-")


@pytest.mark.parametrize("argv, message", [
    (["train", "--n-s", "0"], "n_s must be an integer >= 1"),
    (["train", "--eta-min", "1", "--eta-max", "0.1"], "eta_min (1.0) must not exceed eta_max"),
    (["train", "--config", "missing.toml"], "config file missing.toml does not exist"),
    (["train", "--resume", "somewhere", "--lambda", "0.1"], "drop --lambda"),
    (["train", "--resume", "nowhere"], "not a klayer run folder"),
    (["evaluate", "nowhere"], "holds no saved klayer model"),
    (["predict", "nowhere", "x.png"], "holds no saved klayer model"),
])
def test_user_errors_exit_2_without_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text("hidden = [50]\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown config key(s) hidden; allowed: hidden_sizes" in capsys.readouterr().err


# --- real CIFAR-10 -----------------------------------------------------------------------


def _write_png(path, pixels_row=None, size=32, mode="RGB"):
    from PIL import Image

    if pixels_row is not None:
        hwc = pixels_row.reshape(3, 32, 32).transpose(1, 2, 0)
    else:
        hwc = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(hwc).convert(mode).save(path)
    return path


@pytest.mark.cifar
def test_train_evaluate_predict(cifar_dir, tmp_path, capsys):
    from klayer import data as D

    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "1000", "--hidden", "20",
                 "--n-s", "20", "--cycles", "1", "--batch-size", "50", "--out", str(run),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "step 40/40" in out and "test accuracy" in out
    for name in (runs.CONFIG_FILE, runs.CHECKPOINT_FILE, runs.HISTORY_FILE, runs.MODEL_FILE,
                 runs.HEADER_FILE, runs.SUMMARY_FILE, "curves.png"):
        assert (run / name).is_file(), name
    summary = runs.read_summary(run)
    assert summary["steps"] == 40 and 0 < summary["final"]["test_accuracy"] <= 1
    assert runs.read_config(run).subset == 1000

    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "on 1000 images" in out
    assert all(name in out for name in D.CLASS_NAMES)
    assert (run / "confusion.png").is_file()

    pixels, labels = D.read_batch(D.batch_files(cifar_dir)[D.TEST_BATCH])
    net, standardizer, names = modelfile.read_model(run)
    expected = net.predict(standardizer.transform(pixels[:2], net.dtype))
    paths = [_write_png(tmp_path / f"img{i}.png", pixels[i]) for i in range(2)]
    assert main(["predict", str(run), *map(str, paths), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, path, label in zip(lines, paths, expected):
        assert line.startswith(f"{path}: {names[label]} (") and line.count("%") == 3

    big = _write_png(tmp_path / "big.png", size=40)
    assert main(["predict", str(run), str(big)]) == 2
    assert "is 40x40 pixels" in capsys.readouterr().err
    assert main(["predict", str(run), str(big), "--resize"]) == 0
    gray = _write_png(tmp_path / "gray.png", pixels[0], mode="L")
    assert main(["predict", str(run), str(gray)]) == 2
    assert "grayscale" in capsys.readouterr().err


@pytest.mark.cifar
def test_beyond_flags_train_and_evaluate_with_other_statistics(cifar_dir, tmp_path, capsys):
    """The new options reach the run's config from the flags; evaluate recomputes the
    batch-norm statistics (PreciseBN, adaptive BN) without changing the model file."""
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "1000", "--hidden", "20,20",
                 "--n-s", "20", "--cycles", "1", "--batch-size", "50", "--dtype", "float32",
                 "--norm-position", "after", "--residual", "--dropout", "0.1",
                 "--label-smoothing", "0.1", "--flip", "--translate", "2", "--jitter", "0.1",
                 "--optimizer", "momentum", "--schedule", "cosine", "--warmup-steps", "5",
                 "--precise-bn", "4", "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "batch norm after ReLU" in out and "residual" in out and "dropout 0.1" in out
    assert "flips, translations ±2 px, jitter 0.1" in out
    assert "with the moving averages: test accuracy" in out and "with PreciseBN (4 batches)" in out
    config = runs.read_config(run)
    assert (config.norm_position, config.residual, config.dropout, config.label_smoothing,
            config.flip, config.translate, config.jitter, config.schedule, config.warmup_steps,
            config.precise_bn) == ("after", True, 0.1, 0.1, True, 2, 0.1, "cosine", 5, 4)
    summary = runs.read_summary(run)
    assert set(summary["final_moving_average"]) >= {"test_accuracy", "val_accuracy"}

    model = (run / runs.MODEL_FILE).read_bytes()
    assert main(["evaluate", str(run), "--precise-bn", "5", "--adaptive-bn"]) == 0
    out = capsys.readouterr().out
    assert "PreciseBN over 5 training batches of 50" in out
    assert "adaptive BN, statistics of the 1000 test images (transductive)" in out
    assert "the saved statistics (PreciseBN over 4 batches)" in out
    assert (run / runs.MODEL_FILE).read_bytes() == model

    nobn = tmp_path / "nobn"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "500", "--hidden", "10",
                 "--no-batch-norm", "--layer-norm", "--n-s", "5", "--cycles", "1",
                 "--batch-size", "50", "--out", str(nobn), "--quiet"]) == 0
    assert "layer norm" in capsys.readouterr().out
    assert main(["evaluate", str(nobn), "--adaptive-bn"]) == 2
    assert "has no batch norm" in capsys.readouterr().err


@pytest.mark.cifar
def test_no_hidden_layer_with_default_batch_norm_trains_and_evaluates(cifar_dir, tmp_path,
                                                                      capsys):
    run = tmp_path / "softmax"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "500", "--hidden", "",
                 "--n-s", "5", "--cycles", "1", "--batch-size", "50", "--out", str(run),
                 "--quiet"]) == 0
    assert "1-layer network (hidden none" in capsys.readouterr().out
    assert main(["evaluate", str(run)]) == 0
    assert "test accuracy" in capsys.readouterr().out
