"""One source for each number: the numbers of README.md and docs/*.md that come from a
result file are the numbers in that file.

- the study's results (README.md, docs/study.md) are docs/reproduction/REPORT.md's, the
  report `klayer reproduce --extended` wrote;
- the best MLP's tables on docs/best-mlp.md are what experiments/seeds.py prints on the
  committed runs in docs/best_mlp/v7/, v6/, v5/ and v3/; the README's is the v7 one, and
  the performance page's wall time a seed is its mean;
- the float32-against-float64 table on docs/performance.md is the output of
  benchmarks/dtype_accuracy.py kept in docs/results/dtype_accuracy.md, and the standard
  runs on docs/training.md are its float64 runs;
- the ratios of the performance tables are their own columns divided, and no other page
  gives a step time of its own; the machine is described on the performance page only.
"""

from __future__ import annotations

import re
import statistics

import pytest

from conftest import REPO_ROOT
from test_experiments_seeds import load_seeds_script

DOCS = REPO_ROOT / "docs"
REPORT = (DOCS / "reproduction" / "REPORT.md").read_text(encoding="utf-8")
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
STUDY = (DOCS / "study.md").read_text(encoding="utf-8")
PERFORMANCE = (DOCS / "performance.md").read_text(encoding="utf-8")
DTYPE_RESULT = (DOCS / "results" / "dtype_accuracy.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """From the line ``heading`` to the next heading of the same or a higher level."""
    start = text.index(heading + "\n")
    level = len(heading) - len(heading.lstrip("#"))
    rest = text[start + len(heading):]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return heading + (rest[:end.start()] if end else rest)


def table(text: str, header: str) -> list[list[str]]:
    """The cells of each body row of the Markdown table whose header starts with ``header``."""
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?", cell)]


# --- the study: README.md and docs/study.md against REPORT.md ---------------------------


def report_rows(heading: str, header: str) -> list[list[str]]:
    return table(section(REPORT, heading), header)


def expected_study_results() -> dict[str, list[str]]:
    """First words of each row of the results table -> its accuracy cells, from REPORT.md."""
    ii = {r[0]: r[1] for r in report_rows("## ii) 3-layer network", "| network |")}
    iii = {r[0]: r[1] for r in report_rows("## iii) 9-layer network", "| network |")}
    final = re.search(r"Final run: λ = ([\d.e+-]+),.*?\*\*test accuracy ([\d.]+%)\*\*", REPORT)
    sigma = report_rows("## v) Initialisation sensitivity", "| σ |")
    return {
        "3-layer": [ii["3-layer with batch norm"], ii["3-layer without batch norm"]],
        "9-layer": [iii["9-layer with batch norm"], iii["9-layer without batch norm"]],
        "final": [final.group(2), ""],
        "σ": [" / ".join(r[2] for r in sigma), " / ".join(r[1] for r in sigma)],
    }


@pytest.mark.parametrize("name, text", [("README.md", README), ("docs/study.md", STUDY)])
def test_study_results_table_is_the_report(name, text):
    rows = table(text, "| run (test accuracy) | with batch norm | without batch norm |")
    expected = expected_study_results()
    assert len(rows) == len(expected), name
    for row, (first, cells) in zip(rows, expected.items()):
        assert row[0].startswith(first), (name, row)
        assert row[1:3] == cells, (name, row[0])
    final_lam = re.search(r"Final run: λ = ([\d.e+-]+)", REPORT).group(1)
    cited = {f"λ = {float(final_lam):.2e}", f"λ = {final_lam}"}  # rounded, or as REPORT.md has it
    assert any(c.replace("e-0", "e-") in rows[2][0] for c in cited), name


def test_study_prose_numbers_are_in_the_report():
    """Every accuracy and every error of the study page's results come from REPORT.md."""
    text = (section(STUDY, "## Results of the committed reproduction")
            + section(STUDY, "## Beyond the study"))
    cited = set(re.findall(r"\d+\.\d+%|\d\.\d+e-\d+", text))
    assert len(cited) >= 30
    report = re.sub(r"e-0(\d)", r"e-\1", REPORT)  # 7.20e-03 is cited as 7.20e-3 too
    missing = sorted(x for x in cited if x not in REPORT and x not in report)
    assert not missing, f"docs/study.md gives numbers REPORT.md does not have: {missing}"


def test_extended_table_is_the_report():
    page = table(section(STUDY, "## Beyond the study"), "| change to the baseline")
    report = report_rows("### Techniques", "| change to the baseline")
    assert len(page) == len(report) >= 8
    for mine, theirs in zip(page, report):
        assert numbers(" ".join(mine[1:])) == numbers(" ".join(theirs[1:])), mine[0]


def test_study_times_are_the_report_time_table():
    rows = {r[0]: r[1].strip("*") for r in report_rows("## Time", "| section |")}
    text = section(STUDY, "## Results of the committed reproduction")
    for key in ("i) gradient checks", "ii, iii, v) training runs", "iv) λ search and final run",
                "ii to v) wall clock, on 2 worker(s)", "vi) beyond the study",
                "**total (wall clock)**"):
        assert re.search(rf"(?<![\d.]){re.escape(rows[key])}(?![\d.])", text), key


def test_precise_bn_summary_is_the_report():
    rows = report_rows("### Moving averages, PreciseBN and adaptive BN", "| run |")
    deltas = [float(r[3]) for r in rows]
    text = section(STUDY, "## Beyond the study")
    assert f"over the {len(rows)} batch-norm runs" in text
    assert f"mean {statistics.mean(deltas):+.2f} points" in text
    assert f"higher in {sum(d > 0 for d in deltas)}" in text
    assert f"at most {max(deltas):+.2f}" in text
    spread = max(abs(float(r[4].rstrip("%")) - float(c.rstrip("%")))
                 for r in rows for c in r[1:3])
    bound = float(re.search(r"within ([\d.]+) points of both", text).group(1))
    assert spread <= bound


# --- the best MLP -----------------------------------------------------------------------


def seeds_py_table(capsys, name: str, config: str) -> str:
    """The table `experiments/seeds.py` prints on the committed runs docs/best_mlp/NAME/."""
    seeds = load_seeds_script()
    argv = ["--config", str(REPO_ROOT / "configs" / config), "--seeds", "0", "1", "2",
            "--out", str(DOCS / "best_mlp" / name)]
    assert seeds.main(argv) == 0  # the runs are finished: reused, never trained here
    printed = capsys.readouterr().out
    return printed[printed.index("| seed |"):].strip()


def test_best_mlp_page_tables_are_what_seeds_py_prints(capsys):
    page = (DOCS / "best-mlp.md").read_text(encoding="utf-8")
    best = seeds_py_table(capsys, "v7", "best_mlp_v7.toml")
    assert best in page
    assert best in README
    assert seeds_py_table(capsys, "v6", "best_mlp_v6.toml") in page
    assert seeds_py_table(capsys, "v5", "best_mlp_v5.toml") in page
    assert seeds_py_table(capsys, "v3", "best_mlp_v3.toml") in page


def test_the_best_mlp_wall_time_on_the_performance_page_is_the_runs():
    best = table((DOCS / "best-mlp.md").read_text(encoding="utf-8"), "| seed | test |")
    mean_std = best[-1][-2]  # "**mean ± std**" row, wall time column: "61.2 ± 3.4 min"
    assert mean_std.endswith(" min") and "±" in mean_std, mean_std
    page = section(PERFORMANCE, "## The study and the best MLP")
    assert f"The best MLP takes {mean_std} a seed" in " ".join(page.split())


# --- performance ------------------------------------------------------------------------


def dtype_rows(text: str) -> list[list[str]]:
    return table(text, "| network | precision |")


def test_dtype_table_is_the_benchmark_output():
    page = section(PERFORMANCE, "## float32 and float64")
    assert dtype_rows(page) == dtype_rows(DTYPE_RESULT)
    for line in re.findall(r"^.*: float32 − float64 = .*$", DTYPE_RESULT, re.M):
        difference = re.search(r"[+-]\d+\.\d+ points", line).group()
        assert difference in page, line
    for row in dtype_rows(DTYPE_RESULT):  # the mean ± std is the seeds'
        accs = [float(c.rstrip("%")) for c in row[2:-1]]
        mean, std = numbers(row[-1])
        assert abs(statistics.mean(accs) - mean) <= 0.006
        assert abs(statistics.stdev(accs) - std) <= 0.006


def test_standard_runs_on_the_training_page_are_the_float64_runs():
    rows = {r[0]: r for r in table((DOCS / "training.md").read_text(encoding="utf-8"),
                                   "| run | test accuracy |")}
    result = {(r[0], r[1]): r[2] for r in dtype_rows(DTYPE_RESULT)}  # seed 0
    assert rows["`configs/3layer_bn.toml`"][1] == result["3-layer BN", "float64"]
    assert rows["`configs/9layer_bn.toml`"][1] == result["9-layer BN", "float64"]


def close(ratio: float, a: float, b: float, digits_a: int, digits_b: int) -> bool:
    """``ratio`` rounds a / b for some a, b that round to the printed values."""
    ha, hb = 0.5 * 10.0 ** -digits_a, 0.5 * 10.0 ** -digits_b
    low, high = (a - ha) / (b + hb), (a + ha) / (b - hb)
    step = 0.5 * 10.0 ** -len(str(ratio).split(".")[1])
    return low - step <= ratio <= high + step


def decimals(cell: str) -> int:
    match = re.search(r"\.(\d+)", cell)
    return len(match.group(1)) if match else 0


def test_step_table_ratios_are_its_columns():
    rows = table(PERFORMANCE, "| work | klayer | PyTorch |")
    assert len(rows) == 4
    for row in rows:
        (mine,), (torch,), (ratio,) = numbers(row[1]), numbers(row[2]), numbers(row[3])
        assert close(ratio, mine, torch, decimals(row[1]), decimals(row[2])), row[0]
        if row[4]:
            (jax,), (to_jax,) = numbers(row[4]), numbers(row[5])
            assert close(to_jax, mine, jax, decimals(row[1]), decimals(row[4])), row[0]


def test_epoch_and_search_tables_are_their_columns():
    for row in table(PERFORMANCE, "| network | klayer | PyTorch |"):
        (mine,), (torch,), (ratio,) = numbers(row[1]), numbers(row[2]), numbers(row[3])
        assert close(ratio, mine, torch, 2, 2), row[0]
    rows = table(PERFORMANCE, "| where trials run | seconds |")
    serial = float(rows[0][1])
    for row in rows:
        seconds, per_trial, speed_up = float(row[1]), float(row[2]), numbers(row[3])[0]
        assert close(per_trial, seconds, 4, 1, 9), row[0]
        assert close(speed_up, serial, seconds, 1, 1), row[0]


def test_no_other_page_gives_a_step_time_of_its_own():
    times = set(re.findall(r"\d+\.\d+ ms", PERFORMANCE))
    assert len(times) >= 6
    for path in (p for p in DOCS.glob("*.md") if p.name != "performance.md"):
        found = set(re.findall(r"\d+\.\d+ ms", path.read_text(encoding="utf-8")))
        assert found <= times, f"{path.relative_to(REPO_ROOT)} gives step times {found - times}"
    # the README and the benchmarks' README link the performance page instead of giving
    # times of their own: no millisecond-precise number that the page does not have
    timed = r"(?<![\d.])\d+\.\d{3}(?= ?(?:ms|s)\b| \|)"  # "0.964 ms", "| 1.868 |"
    precise = set(re.findall(timed, PERFORMANCE))
    for path in (REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md"):
        found = set(re.findall(timed, path.read_text(encoding="utf-8")))
        assert found <= precise, f"{path.relative_to(REPO_ROOT)} gives {found - precise}"


def test_the_machine_is_described_once():
    assert "AMD EPYC" in PERFORMANCE and "OpenBLAS" in PERFORMANCE
    pages = [REPO_ROOT / "README.md", *(p for p in DOCS.glob("*.md")
                                        if p.name != "performance.md")]
    for path in pages:
        text = path.read_text(encoding="utf-8")
        for phrase in ("this machine", "this 2-core machine", "AMD EPYC", "OpenBLAS 0."):
            assert phrase not in text, f"{path.relative_to(REPO_ROOT)}: {phrase!r}"


def test_the_scaling_slopes_on_the_performance_page_are_the_committed_run():
    full = (DOCS / "performance" / "scaling.md").read_text(encoding="utf-8")
    page = section(PERFORMANCE, "## How the cost grows")
    assert table(page, "| axis | sizes |") == table(full, "| axis | sizes |")
    assert table(page, "| axis | sizes |")  # not two empty tables
