"""MODEL.md: the model card written from a run's files, by evaluate and export."""

import re

import pytest

from klayer import data as D
from klayer import runs
from klayer.cli import main
from klayer.config import TrainConfig
from klayer.model_card import model_card, write_model_card
from klayer.nn.network import Network

from conftest import onnx_or_skip


def architecture(**options):
    return Network(3072, [50, 50], 10, **options).hyperparameters()


SUMMARY = {"klayer_version": "0.1.0", "config_hash": "0123456789abcdef",
           "final": {"train_accuracy": 0.6, "train_loss": 1.1, "val_accuracy": 0.52,
                     "val_loss": 1.4, "test_accuracy": 0.515, "test_loss": 1.41},
           "best_val_accuracy": 0.53, "best_step": 800, "steps": 900, "epochs": 2.0}
EVALUATION = {"accuracy": 0.5123, "loss": 1.3861, "images": 10000,
              "statistics": "the saved moving averages",
              "per_class": [(0.5 + c / 100, 1000) for c in range(10)]}


def test_card_states_architecture_protocol_results_and_limits():
    config = TrainConfig(hidden_sizes=(50, 50), subset=2000, flip=True, n_s=450, cycles=1)
    text = model_card("best", architecture(), config, SUMMARY, [{}] * 11, EVALUATION,
                      D.CLASS_NAMES, figures=("confusion.png", "curves.png"))
    assert text.startswith("# Model card: best\n")
    for section in ("## Architecture", "## Training data and protocol", "## Results",
                    "## Known limits"):
        assert section in text
    assert "3072 → 50 → 50 → 10 (156,910 parameters)" in text  # weights, biases, γ and β
    assert "batch norm before each hidden ReLU" in text
    assert "first 2000 images of each split" in text and "2,000 training" in text
    assert "augmentation: flips" in text and "900 steps" in text
    assert "Config hash `0123456789abcdef`" in text
    assert "| test | 51.50% | 1.4100 |" in text
    assert "**51.23%**" in text and "with the saved moving averages" in text
    rows = re.findall(r"^\| (\w+) \| ([\d.]+)% \| 1000 \|$", text, re.M)
    assert rows == [(name, f"{50 + c:.2f}") for c, name in enumerate(D.CLASS_NAMES)]
    assert "![Confusion matrix](confusion.png)" in text and "(curves.png)" in text
    assert "32×32 RGB" in text and "10 classes" in text and "moving averages" in text


def test_card_without_evaluation_config_or_batch_norm():
    text = model_card("copy", architecture(batch_norm=False, layer_norm=True,
                                           residual=True, dropout=0.2))
    assert "Per-class test accuracy: not measured yet" in text
    assert "config.toml is missing" in text and "confusion.png" not in text
    assert "layer norm before each hidden ReLU" in text and "residual connections" in text
    assert "dropout p = 0.2" in text and "no batch statistics are involved" in text


def test_write_model_card_reads_the_run_folder(tmp_path):
    net = Network(3072, [20], 10)
    config = TrainConfig(hidden_sizes=(20,), protocol="single")
    runs.write_config(tmp_path, config)
    runs.write_summary(tmp_path, SUMMARY)
    path = write_model_card(tmp_path, net, D.CLASS_NAMES)
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "MODEL.md" and f"# Model card: {tmp_path.name}" in text
    assert 'protocol "single": training batch 1' in text and "| val | 52.00% |" in text


@pytest.mark.cifar
def test_export_writes_the_card_and_evaluate_completes_it(cifar_dir, tmp_path, capsys):
    onnx_or_skip()
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--subset", "500", "--hidden", "10",
                 "--n-s", "10", "--cycles", "1", "--batch-size", "50", "--out", str(run),
                 "--quiet"]) == 0
    assert main(["export", str(run)]) == 0
    assert "MODEL.md" in capsys.readouterr().out
    card = (run / "MODEL.md").read_text(encoding="utf-8")
    assert "not measured yet" in card and "first 500 images" in card

    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    card = (run / "MODEL.md").read_text(encoding="utf-8")
    overall = re.search(r"test accuracy ([\d.]+)% on 500 images", out).group(1)
    assert f"**{overall}%**" in card and "![Confusion matrix](confusion.png)" in card
    for name in D.CLASS_NAMES:  # the card's per-class numbers are those evaluate printed
        printed = re.search(rf"^\s+{name}\s+([\d.]+)%", out, re.M).group(1)
        assert re.search(rf"\| {name} \| {re.escape(printed)}% \| \d+ \|", card)

    before = card
    assert main(["export", str(run), "--format", "onnx"]) == 0  # keeps an existing card
    assert (run / "MODEL.md").read_text(encoding="utf-8") == before


def test_card_names_every_batch_transformation_of_the_config():
    config = TrainConfig(hidden_sizes=(50, 50), flip=True, translate=3, pad_mode="reflect",
                         mixup=0.2, n_s=450, cycles=1)
    text = model_card("mixed", architecture(), config, SUMMARY, [{}] * 11)
    assert ("- augmentation: flips, translations ±3 px (reflect padding), MixUp α=0.2\n"
            in text)
    plain = model_card("plain", architecture(), TrainConfig(hidden_sizes=(50, 50)), SUMMARY)
    assert "- augmentation: none\n" in plain
