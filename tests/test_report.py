"""REPORT.md's sentences follow the numbers: the report's sections written from planted
accuracies (no training), so that each verdict, and each Δ, is checked in both directions,
at ties and at the one-point noise rule. The real study's report is checked in
test_reproduce.py."""

import math
import re
from types import SimpleNamespace

import pytest

from klayer.study import report
from klayer.config import TrainConfig
from klayer.study.extended import BNEvaluation, ExtendedResult
from klayer.study.sections import QUICK, Run

LN10 = math.log(10)


def planted(name, test, *, val=None, train_loss=1.5, bn=True, hidden=(50, 50), init="he",
            label=None):
    """A finished study run with the given final numbers (two history points)."""
    val = test if val is None else val
    history = [{"step": s, "epoch": s / 10, **{f"{split}_{q}": v for split in ("train", "val")
                                              for q, v in (("loss", train_loss),
                                                           ("cost", train_loss),
                                                           ("accuracy", val))}}
               for s in (0, 10)]
    summary = {"final": {"test_accuracy": test, "val_accuracy": val, "train_loss": train_loss},
               "timings": {"total_seconds": 1.0}}
    config = TrainConfig(hidden_sizes=hidden, batch_norm=bn, init=init, lam=0.005)
    return Run(name, label or name, config, summary=summary, history=history)


def study(tmp_path, **fields):
    return SimpleNamespace(out=tmp_path, budget=QUICK, **fields)


# --- sections ii and iii: which network is better ---------------------------------------------


@pytest.mark.parametrize("bn, nobn, verdict", [
    (0.50, 0.40, "The 3-layer network with batch norm reaches the higher test accuracy, "
                 "by 10.00 points"),
    (0.40, 0.50, "The 3-layer network without batch norm reaches the higher test accuracy, "
                 "by 10.00 points"),
    (0.4949, 0.50, "The 3-layer network without batch norm reaches the higher test accuracy, "
                   "by 0.51 points"),
    (0.50, 0.497, "With batch norm and without, the 3-layer network ends within 0.30 points "
                  "of each other: no difference"),
    (0.497, 0.50, "With batch norm and without, the 3-layer network ends within 0.30 points "
                  "of each other: no difference"),
    (0.50, 0.50, "ends within 0.00 points of each other"),
])
def test_depth_verdict_names_the_better_network(tmp_path, bn, nobn, verdict):
    pair = [planted("bn", bn, bn=True), planted("nobn", nobn, bn=False)]
    text = report._depth(study(tmp_path), "ii", pair, tmp_path)
    assert verdict in text
    assert text.count("reaches the higher") + text.count("ends within") == 1
    assert f"| bn | {bn:.2%} |" in text and f"| nobn | {nobn:.2%} |" in text


# --- section v: "does not learn" only when the numbers say so ---------------------------------


def _sigma_pair(sigma, nobn, bn):
    return [planted(f"s{sigma}_nobn", init=sigma, bn=False, **nobn),
            planted(f"s{sigma}_bn", init=sigma, bn=True, **bn)]


STUCK = dict(test=0.10, val=0.10, train_loss=LN10 + 0.01)  # chance, loss ≈ ln 10
LEARNS = dict(test=0.45, val=0.44, train_loss=1.4)


@pytest.mark.parametrize("nobn, bn, sentence", [
    (STUCK, LEARNS, "At σ = 0.001 the network without batch norm does not learn (test "
                    "accuracy 10.00%, training loss 2.313 ≈ ln 10), while with batch norm it "
                    "reaches 45.00%."),
    (LEARNS, STUCK, "At σ = 0.001: 10.00% with batch norm, 45.00% without."),
    (LEARNS, LEARNS, "At σ = 0.001 both learn: 45.00% with batch norm, 45.00% without."),
    # near chance in accuracy but the loss has left ln 10: it is not "stuck"
    (dict(test=0.10, val=0.12, train_loss=LN10 - 0.2), LEARNS,
     "At σ = 0.001: 45.00% with batch norm, 10.00% without."),
    # stuck, but batch norm does not clearly learn either (validation 15% or less)
    (STUCK, dict(test=0.15, val=0.15, train_loss=2.2),
     "At σ = 0.001: 15.00% with batch norm, 10.00% without."),
])
def test_initialisation_sentences_follow_the_numbers(tmp_path, nobn, bn, sentence):
    text = report._initialisation(study(tmp_path, init=_sigma_pair(1e-3, nobn, bn)), tmp_path)
    assert sentence in text
    assert ("does not learn" in text) == sentence.endswith("reaches 45.00%.")


def test_initialisation_rows_go_from_large_to_small_sigma(tmp_path):
    runs = [*_sigma_pair(1e-4, STUCK, LEARNS), *_sigma_pair(1e-1, LEARNS, LEARNS)]
    text = report._initialisation(study(tmp_path, init=runs), tmp_path)
    assert text.index("| 0.1 | 45.00% | 45.00% |") < text.index("| 0.0001 | 10.00% | 45.00% |")
    assert text.index("At σ = 0.1 both learn") < text.index("At σ = 0.0001 the network without")


# --- section vi: Δ against the baseline and the one-point rule --------------------------------

DEPTHS = ("3-layer", "9-layer")
# test accuracy of each technique run; the baselines are 0.50 (3-layer) and 0.30 (9-layer)
TECHNIQUES = {"dropout": (0.52, 0.295), "Adam": (0.485, 0.3105), "EMA": (0.50, 0.2901),
              "layer norm": (0.5099, 0.311)}
BASELINES = {"3-layer": (0.50, 0.47), "9-layer": (0.30, 0.35)}  # (BN, no normalization)


def extended(tmp_path, precise=(0.52, 0.49)):
    baselines, techniques = {}, {}
    for i, d in enumerate(DEPTHS):
        hidden = (50, 50) if i == 0 else (10,) * 8
        bn, none = BASELINES[d]
        baselines[d] = (planted(f"{d}_bn", bn, hidden=hidden),
                        planted(f"{d}_nobn", none, bn=False, hidden=hidden))
        techniques[d] = [planted(f"ext_{label}_{d}", accs[i], hidden=hidden, label=label)
                         for label, accs in TECHNIQUES.items()]
    case = SimpleNamespace(title="dropout", hidden=(8, 8), seed=0, worst_relative_order2=1e-8,
                           worst_relative=1e-9, worst_absolute=None, passed=True)
    evaluations = [BNEvaluation(baselines["3-layer"][0], 0.50, precise[0], 0.55),
                   BNEvaluation(techniques["3-layer"][0], 0.52, precise[1], 0.53)]
    e = ExtendedResult(gradcheck=[case], lam=0.005, baselines=baselines, techniques=techniques,
                       bn_evaluations=evaluations, precise_batches=10, seconds={})
    return report._extended(study(tmp_path, extended=e), tmp_path)


def _technique_rows(text):
    """{label: [(accuracy, Δ) per depth]} from the techniques table."""
    table = text.split("### Techniques")[1].split("\n\n")[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = list(zip(cells[1::2], cells[2::2]))
    return rows


def test_extended_delta_column_is_the_change_against_the_baseline(tmp_path):
    rows = _technique_rows(extended(tmp_path))
    assert rows["dropout"] == [("52.00%", "+2.00"), ("29.50%", "-0.50")]
    assert rows["Adam"] == [("48.50%", "-1.50"), ("31.05%", "+1.05")]
    assert rows["EMA"] == [("50.00%", "+0.00"), ("29.01%", "-0.99")]
    assert rows["layer norm"] == [("50.99%", "+0.99"), ("31.10%", "+1.10")]
    assert rows["no normalization (section ii/iii)"] == [("47.00%", "-3.00"),
                                                         ("35.00%", "+5.00")]
    baseline = next(label for label in rows if label.startswith("none (baseline"))
    assert rows[baseline] == [("50.00%", "—"), ("30.00%", "—")]


def test_extended_verdict_applies_the_one_point_rule_in_both_directions(tmp_path):
    text = extended(tmp_path)
    verdict = next(line for line in text.splitlines() if line.startswith("On the 3-layer"))
    assert ("On the 3-layer network, one point or more better than the baseline: dropout "
            "(+2.00). One point or more worse: no normalization (section ii/iii) (-3.00); "
            "Adam (-1.50).") in verdict
    assert ("On the 9-layer network, one point or more better than the baseline: "
            "no normalization (section ii/iii) (+5.00); Adam (+1.05); layer norm (+1.10). "
            "Nothing is a point or more worse.") in verdict
    # under a point either way, and the tie, are named nowhere in the verdict
    for within_noise in ("EMA", "(+0.99)", "(-0.99)", "(-0.50)", "(+0.00)"):
        assert within_noise not in verdict


def test_extended_verdict_when_nothing_moves_a_point(tmp_path):
    rows = [("dropout", {"3-layer": planted("a", 0.505)}), ("Adam", {"3-layer": planted("b", 0.4951)})]
    text = report._technique_verdict(rows, {"3-layer": planted("base", 0.50)}, ["3-layer"])
    assert text == ("On the 3-layer network, nothing beats the baseline by a point or more. "
                    "Nothing is a point or more worse.")


def test_extended_precise_bn_summary_counts_the_signs(tmp_path):
    # PreciseBN +2.00 on the baseline, -3.00 on dropout
    text = extended(tmp_path, precise=(0.52, 0.49))
    assert "| 3-layer: baseline | 50.00% | 52.00% | +2.00 | 55.00% |" in text
    assert "| 3-layer: dropout | 52.00% | 49.00% | -3.00 | 53.00% |" in text
    assert ("mean change -0.50 points over 2 runs, higher in 1, largest change -3.00."
            in text)
    assert "already close" not in text
    # a tie is not "higher"; changes under a point read as "already close"
    close = extended(tmp_path, precise=(0.50, 0.525))
    assert "mean change +0.25 points over 2 runs, higher in 1, largest change +0.50." in close
    assert "The moving averages are already close" in close


def test_learns_and_stuck_at_chance_thresholds():
    assert report.learns(planted("a", 0.2, val=0.151))
    assert not report.learns(planted("a", 0.2, val=0.15))
    assert report.stuck_at_chance(planted("a", 0.149, train_loss=LN10 - 0.049))
    assert report.stuck_at_chance(planted("a", 0.10, train_loss=LN10 + 0.049))
    assert not report.stuck_at_chance(planted("a", 0.15, train_loss=LN10))
    assert not report.stuck_at_chance(planted("a", 0.10, train_loss=LN10 - 0.051))
    assert not report.stuck_at_chance(planted("a", 0.10, train_loss=LN10 + 0.051))
