"""``klayer evaluate`` on the run's own test split, and ``klayer predict`` on images that
are huge, crafted, truncated or not images at all."""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest

from klayer import runs
from klayer import modelfile
from klayer.cli import main
from klayer.commands.predict import MAX_SIDE, read_image
from klayer.data import CLASS_NAMES, Standardizer
from klayer.nn.network import Network

# --------------------------------------------------------------------------- evaluate


@pytest.mark.cifar
def test_evaluate_uses_the_runs_own_test_split(cifar_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "500", "--hidden", "20",
                 "--n-s", "10", "--cycles", "1", "--batch-size", "50", "--out", str(run),
                 "--quiet"]) == 0
    final = runs.read_summary(run)["final"]
    capsys.readouterr()

    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test split: 500 images (subset 500 of the run's config)" in out
    assert (f"test accuracy {final['test_accuracy']:.2%} on 500 images "
            f"(loss {final['test_loss']:.4f})") in out

    # a model file without its config.toml: the whole test batch, said so
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (runs.MODEL_FILE, runs.HEADER_FILE):
        shutil.copy(run / name, copy / name)
    assert main(["evaluate", str(copy / runs.MODEL_FILE), "--data-dir", str(cifar_dir)]) == 0
    out = capsys.readouterr().out
    assert "test split: 10,000 images (the whole test batch: no config.toml" in out
    assert "on 10000 images" in out


# --------------------------------------------------------------------------- predict


def png_header_only(path, width: int, height: int):
    """A PNG whose header declares a width x height RGB image, with (almost) no image
    data: what a decompression bomb looks like to a program that reads the header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def write_png(path, size=32):
    from PIL import Image

    hwc = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(hwc).save(path)
    return path


@pytest.fixture
def model_run(tmp_path):
    """A run folder with a small untrained model on 3072 inputs."""
    net = Network(3072, [8], batch_norm=False, dtype="float32", seed=0)
    standardizer = Standardizer(np.full(3072, 0.5), np.full(3072, 0.25))
    run = tmp_path / "run"
    run.mkdir()
    modelfile.save_model(run, net, standardizer, CLASS_NAMES)
    return run


def predict_error(run, capsys, *argv) -> str:
    """The one line ``klayer predict`` prints on stderr when it exits with status 2."""
    assert main(["predict", str(run), *map(str, argv)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("klayer predict: error: ")
    return err


def test_predict_refuses_huge_images_before_decoding(model_run, tmp_path, capsys):
    huge = png_header_only(tmp_path / "huge.png", 14000, 14000)
    assert "huge.png is refused: too many pixels" in predict_error(model_run, capsys, huge)
    assert "huge.png" in predict_error(model_run, capsys, huge, "--resize")
    big = png_header_only(tmp_path / "big.png", 5000, 5000)  # below Pillow's own limit
    assert "big.png is 5000x5000 pixels; the model takes 32x32" in \
        predict_error(model_run, capsys, big)
    err = predict_error(model_run, capsys, big, "--resize")
    assert f"big.png is 5000x5000 pixels, more than --resize accepts ({MAX_SIDE}x" in err


def test_size_is_checked_even_without_pillows_limit(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's bomb check switched off
    huge = png_header_only(tmp_path / "huge.png", 14000, 14000)
    with pytest.raises(ValueError, match="is 14000x14000 pixels; the model takes 32x32"):
        read_image(huge)
    with pytest.raises(ValueError, match="more than --resize accepts"):
        read_image(huge, resize=True)


def test_predict_refuses_files_that_are_not_images(model_run, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    assert "notes.png is not an image file Pillow can read" in \
        predict_error(model_run, capsys, text)
    whole = write_png(tmp_path / "whole.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    assert "cut.png: the image data is corrupt or truncated" in \
        predict_error(model_run, capsys, cut)
    assert "does not exist" in predict_error(model_run, capsys, tmp_path / "absent.png")


def test_predict_accepts_32x32_and_resizes_within_the_bound(model_run, tmp_path, capsys):
    small, larger = write_png(tmp_path / "small.png"), write_png(tmp_path / "larger.png", 64)
    assert main(["predict", str(model_run), str(small), str(larger), "--resize"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(small), str(larger)]
    assert all(line.split(": ")[1].split(" (")[0] in CLASS_NAMES for line in lines)
    assert read_image(small).shape == (3072,) and read_image(small).dtype == np.uint8
