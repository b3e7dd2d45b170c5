"""klayer diagnose table: which bugs fit a reported table of per-layer relative errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klayer import cli
from klayer.diagnose import table as T

FIXTURE = Path(__file__).parent / "data" / "course_report_tables.md"
# what both batch-norm tables of the fixture show: W of every batch-norm layer wrong,
# γ and β of the last batch-norm layer right, the last layer right
FITS = {"variance-not-biased", "gamma-missing-in-backward", "mean-term-missing",
        "variance-term-missing", "numeric-with-running-stats"}
RULED_OUT = {"relu-mask-from-wrong-tensor", "l2-factor", "loss-not-averaged",
             "eps-outside-sqrt", "step-too-large", "float32-numeric", "none"}


def test_parses_the_report_tables():
    tables = T.parse(FIXTURE.read_text())
    assert [len(t.layers) for t in tables] == [4, 2, 3]
    two = tables[1]
    assert two.layers == ["Layer 0", "Layer 1"]
    assert two.cells[(0, "W")] == 0.323 and two.cells[(0, "b")] == 1.0
    assert two.cells[(0, "beta")] == 1.98e-10 and two.cells[(0, "gamma")] == 1.93e-10
    assert (1, "gamma") not in two.cells


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    text, results = T.explain(FIXTURE.read_text())
    return text, results


def test_report_tables_fit_the_expected_bugs(results):
    text, res = results
    assert len(res) == 2  # the table without batch norm is skipped
    assert "no β or γ column: not a batch-norm network; skipped" in text
    for r in res:
        names = {f["bug"] for f in r["consistent"]}
        assert names == FITS, r["title"]
        assert not names & RULED_OUT
        gamma = next(f for f in r["consistent"] if f["bug"] == "gamma-missing-in-backward")
        assert gamma["states"] == ["after training (γ ≠ 1, β ≠ 0)"]  # invisible at γ = 1
    assert res[0]["pattern"] == {"W1": "wrong", "W2": "right", "b1": "wrong", "b2": "right",
                                 "beta1": "right", "gamma1": "right"}
    assert "b1, b2 feed batch norm" in text and "bn-bias-false-alarm" in text


def test_report_values_are_closest_in_size_to_frozen_statistics(results):
    """The reported 0.3-0.6 are norm-wise errors; simulated, frozen batch statistics in
    the numerical check come closest, a 1/(n-1) variance is ten times too small."""
    _, res = results
    for r in res:
        ranked = [x["bug"] for x in r["by_size"]]
        assert ranked[0] == "numeric-with-running-stats", r["title"]
        assert ranked[-1] == "variance-not-biased"
        assert "gamma-missing-in-backward" not in ranked  # invisible at γ = 1
        assert r["by_size"][0]["distance"] < 0.15
    three = res[1]["by_size"][0]["simulated"]
    assert set(three) == {"W1", "beta1", "gamma1", "W2"}


def test_a_simulated_bug_table_is_attributed_to_that_bug():
    case = T.states(3)["at initialisation (γ = 1, β = 0)"]
    sim = T.simulate(case, "relu-mask-from-wrong-tensor")
    rows = ["| layer | W | b | beta | gamma |", "|---|---|---|---|---|"]
    for l in (1, 2, 3):
        cells = [f"{sim[(l, p)]:.2e}" if (l, p) in sim else "" for p in ("W", "b", "beta", "gamma")]
        rows.append(f"| {l} | " + " | ".join(cells) + " |")
    _, res = T.explain("\n".join(rows))
    names = {f["bug"] for f in res[0]["consistent"]}
    assert "relu-mask-from-wrong-tensor" in names
    assert "mean-term-missing" not in names and "none" not in names


def test_a_correct_table_fits_correct_code():
    text, res = T.explain("| Layer | W | b | γ | β |\n|--|--|--|--|--|\n"
                          "| 1 | 2e-10 | 1.0 | 3e-10 | 1e-10 |\n| 2 | 1e-10 | 2e-10 | | |\n")
    assert "a correct implementation fits this table" in text
    assert "none" in {f["bug"] for f in res[0]["consistent"]}


def test_command_prints_and_writes_json(tmp_path, capsys):
    assert cli.main(["diagnose", "table", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert out.count("consistent with:") == 2 and "numeric-with-running-stats" in out
    assert cli.main(["diagnose", "table", str(FIXTURE), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_file_without_table_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "notes.md"
    path.write_text("no table here\n")
    assert cli.main(["diagnose", "table", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("klayer diagnose: error: no Markdown table") and err.count("\n") == 1
