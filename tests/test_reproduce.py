"""`klayer reproduce --quick --extended` on real CIFAR-10: every section, valid figures,
right claims."""

import re
from pathlib import Path

import pytest

from klayer.cli import main
from klayer.study.extended import GRADCHECK_CASES, TECHNIQUES

pytestmark = pytest.mark.slow  # one `klayer reproduce --quick --extended` for the module

SECTIONS = ["## i) Gradient verification", "## ii) 3-layer network", "## iii) 9-layer network",
            "## iv) λ search", "## v) Initialisation sensitivity", "## vi) Beyond the study",
            "## Time"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_report(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduction")
    code = main(["reproduce", "--quick", "--extended", "--out", str(out), "--data-dir",
                 str(cifar_dir), "--workers", "2", "--quiet"])
    assert code == 0
    return out, (out / "REPORT.md").read_text(encoding="utf-8")


@pytest.mark.cifar
def test_report_has_every_section(quick_report):
    _, text = quick_report
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "**All checks pass.**" in text


@pytest.mark.cifar
def test_every_figure_named_exists_and_is_a_png(quick_report):
    out, text = quick_report
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) >= 9  # 3-layer, 9-layer, λ, final, three σ, two in section vi
    for name in figures:
        path = out / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name


@pytest.mark.cifar
def test_gradient_errors_within_tolerance(quick_report):
    _, text = quick_report
    section = text[text.index(SECTIONS[0]):text.index(SECTIONS[1])]
    assert "FAIL" not in section
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2 + 3 + 4 + 2 + 3 + 9
    for line in rows:
        for cell in line.split("|")[2:-1]:
            match = re.match(r"\s*([0-9.e+-]+)( \(abs\.†\))?", cell)
            if not match:
                continue
            limit = 1e-8 if match.group(2) else 1e-7
            assert float(match.group(1)) <= limit, line


@pytest.mark.cifar
def test_sigma_1e4_without_bn_stays_at_chance_while_bn_learns(quick_report):
    _, text = quick_report
    row = next(line for line in text.splitlines() if line.startswith("| 0.0001 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    no_bn, bn = (float(c.rstrip("%")) / 100 for c in cells[1:3])
    assert 0.05 <= no_bn <= 0.15
    assert bn >= 0.25
    assert "At σ = 0.0001 the network without batch norm does not learn" in text


@pytest.mark.cifar
def test_running_again_reuses_every_run(quick_report, cifar_dir, capsys):
    out, _ = quick_report
    summaries = lambda: {p: p.stat().st_mtime_ns for p in Path(out).glob("**/summary.json")}
    before = summaries()
    study_runs = list(Path(out, "runs").glob("*/summary.json"))
    assert len(study_runs) == 4 + 6 + 1 + 2 * len(TECHNIQUES)  # ii, iii, v, iv's final, vi
    assert main(["reproduce", "--quick", "--extended", "--out", str(out), "--data-dir",
                 str(cifar_dir), "--workers", "1"]) == 0
    assert capsys.readouterr().out.count("reusing ") == len(study_runs)
    assert summaries() == before  # nothing retrained, search trials included


def _section_vi(text):
    return text[text.index("## vi) Beyond the study"):text.index("## Time")]


@pytest.mark.cifar
def test_extended_gradient_checks_pass(quick_report):
    section = _section_vi(quick_report[1])
    section = section[section.index("### Gradient checks"):section.index("### Techniques")]
    rows = [line for line in section.splitlines()
            if any(line.startswith(f"| {title} |") for title, _, _ in GRADCHECK_CASES)]
    assert len(rows) == len(GRADCHECK_CASES)
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[-1] == "yes", line
        assert float(cells[4]) <= 1e-7, line  # fourth-order, judged
        if cells[5] != "—":
            assert float(cells[5]) <= 1e-8, line
    assert "**All pass**" in section


@pytest.mark.cifar
def test_extended_techniques_table_has_every_technique_at_both_depths(quick_report):
    section = _section_vi(quick_report[1])
    section = section[section.index("### Techniques"):]
    for _, label, _ in TECHNIQUES:
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        accuracies = [float(cells[i].rstrip("%")) for i in (1, 3)]
        assert all(10 <= a <= 100 for a in accuracies), row
        float(cells[2]), float(cells[4])  # the changes are numbers


@pytest.mark.cifar
def test_extended_statistics_table_labels_adaptive_bn_transductive(quick_report):
    section = _section_vi(quick_report[1])
    assert "adaptive BN (transductive)" in section
    rows = [line for line in section.splitlines()
            if line.startswith(("| 3-layer: ", "| 9-layer: "))]
    # every batch-norm run: the two baselines and the techniques but layer norm
    assert len(rows) == 2 + 2 * (len(TECHNIQUES) - 1)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        moving, precise, change = float(cells[1][:-1]), float(cells[2][:-1]), float(cells[3])
        assert abs((precise - moving) - change) < 0.011, row


@pytest.mark.cifar
def test_populations_are_named_and_the_steps_counted(quick_report):
    out, text = quick_report
    header = text[:text.index(SECTIONS[0])]
    assert ("recorded in each run's config): the 3 σ runs with batch norm; "
            "the 3 σ runs without batch norm; 8 trials of the coarse λ grid with batch norm; "
            "8 trials of the coarse λ grid without batch norm; 3 trials of the fine λ search "
            "with batch norm.") in header
    for summary in Path(out, "runs").glob("sigma*/summary.json"):
        assert '"population_size": 3' in summary.read_text()
    for name in ("3layer", "9layer", "final", "ext"):
        for summary in Path(out, "runs").glob(f"{name}*/summary.json"):
            assert "population_size" not in summary.read_text(), summary
    # quick budget: n_s = 200 (ii, iii, vi, final: 800 steps), n_s = 100 (iv, v: 400)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:5]]
            for line in text[text.index("## Time"):].splitlines() if line.startswith("| ")}
    assert rows["ii, iii, v) training runs"] == ["3,200", "800 (2,400)"]
    assert rows["iv) λ search and final run"] == ["800", "1,200 (7,600)"]
    assert rows["vi) beyond the study"] == [f"{2 * len(TECHNIQUES) * 800:,}", "0"]


@pytest.mark.cifar
def test_time_table_adds_up_the_wall_clock_time(quick_report):
    _, text = quick_report
    seconds = {line.split("|")[1].strip(): float(line.split("|")[2].strip(" *"))
               for line in text[text.index("## Time"):].splitlines() if line.startswith("| ")
               and not line.startswith("| section") and not line.startswith("|---")}
    wall = seconds["ii to v) wall clock, on 2 worker(s)"]
    # sections ii to v share two workers: their worker seconds fit in twice their wall time
    assert seconds["ii, iii, v) training runs"] + seconds["iv) λ search and final run"] \
        <= 2 * wall + 0.1
    parts = seconds["i) gradient checks"] + wall + seconds["vi) beyond the study"]
    assert abs(seconds["**total (wall clock)**"] - parts) <= 0.15
