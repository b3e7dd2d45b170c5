"""The diagnose docs: the derivation's references to the core, the catalogue page, the
study's section, and the tutorial notebook (executed)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from klayer.diagnose import bugs as B
from klayer.diagnose import table as T
from klayer.nn import layers, network

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REF = re.compile(r"`(layers|network)\.py` `([\w.]+)`: `([^`]+)`((?:,? (?:and )?`[^`]+`)*)")


def _references():
    text = (DOCS / "batchnorm-backward.md").read_text(encoding="utf-8")
    refs = []
    for module, function, first, more in REF.findall(text):
        for fragment in [first, *re.findall(r"`([^`]+)`", more)]:
            refs.append((module, function, fragment))
    return refs


def test_derivation_cites_the_core_at_every_step():
    refs = _references()
    functions = {f for _, f, _ in refs}
    assert {"affine_forward", "affine_backward", "batchnorm_forward", "batchnorm_backward",
            "relu_forward", "relu_backward", "softmax_cross_entropy", "Network.backward",
            "Network.add_l2_gradient"} <= functions
    assert len(refs) >= 15


@pytest.mark.parametrize("module,function,fragment", _references())
def test_every_quoted_line_is_in_that_function(module, function, fragment):
    obj = {"layers": layers, "network": network}[module]
    for part in function.split("."):
        obj = getattr(obj, part)
    assert fragment in inspect.getsource(obj), f"{function} no longer has {fragment!r}"


def test_derivation_places_every_analytic_bug():
    text = (DOCS / "batchnorm-backward.md").read_text(encoding="utf-8")
    for bug in B.ANALYTIC + ["bn-bias-false-alarm"]:
        assert f"*{bug}*" in text


def test_catalogue_page_matches_the_catalogue():
    text = (DOCS / "diagnose.md").read_text(encoding="utf-8")
    for bug in B.CATALOGUE:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{bug.id}` |"))
        assert bug.symptom in row and bug.fix in row and bug.title in row
        assert row.count("|") == 6  # five cells: no stray "|" inside one


def test_study_section_says_what_the_command_says():
    study = (DOCS / "study.md").read_text(encoding="utf-8")
    section = study.split("## What `klayer diagnose` says about the course report's")[1]
    _, results = T.explain((ROOT / "tests" / "data" / "course_report_tables.md").read_text())
    fits = {f["bug"] for f in results[0]["consistent"]}
    listed = set(re.findall(r"^\| `([\w-]+)` \|", section, re.M))
    assert listed == fits
    for bug in set(B.ANALYTIC + B.NUMERICAL) - fits - {"bn-bias-false-alarm"}:
        assert f"`{bug}`" in section  # ruled out, with the reason


def test_tutorial_runs_and_finds_the_planted_bug():
    import nbclient  # the test extra: pip install -e '.[test]'
    import nbformat
    nb = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(DOCS)}}).execute()
    outputs = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            outputs.append(out.get("text", "") + str(out.get("data", {}).get("text/markdown", "")))
    text = "\n".join(outputs)
    assert "verdict: correct" in text
    assert "wrong -> mean-term-missing (explains it exactly)" in text
    assert "('wrong',\n ['mean-term-missing'" in "\n".join(
        str(o.get("data", {}).get("text/plain", "")) for c in nb.cells for o in c.get("outputs", []))
