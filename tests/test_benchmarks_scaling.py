"""benchmarks/scaling.py --quick: runs on tiny sizes and writes its figures, table and
fitted slopes (no timing assertions: only that the outputs exist and make sense)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "scaling.py"
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import scaling  # noqa: E402


def test_slope_of_a_power_law_is_its_exponent():
    xs = np.array([64, 128, 256, 512])
    assert scaling.slope(xs, 3.0 * xs ** 2) == pytest.approx(2.0)
    assert scaling.slope(xs, 5.0 * xs) == pytest.approx(1.0)
    assert math.isnan(scaling.slope([64], [1.0]))


def test_flops_grow_as_the_ideals_say():
    """Linear in batch and K exactly; quadratic in width once the hidden layers dominate."""
    sizes = dict(scaling.FULL, width=[2 ** 14, 2 ** 15])
    for axis in ("batch", "K"):
        values = scaling.FULL[axis]
        got = scaling.slope(values, [scaling.axis_flops(sizes, axis, v) for v in values])
        assert got == pytest.approx(1.0)
    wide = scaling.slope(sizes["width"], [scaling.axis_flops(sizes, "width", v)
                                          for v in sizes["width"]])
    assert 1.8 < wide < 2.0


def test_quick_run_writes_csv_json_figure_and_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]), MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--libs", "klayer",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("scaling.csv", "scaling.json", "scaling.png", "scaling.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    points = {(r["axis"], int(r["size"])) for r in rows}
    assert points == {(axis, v) for axis in scaling.AXES for v in scaling.QUICK[axis]}
    assert all(float(r["seconds"]) > 0 and int(r["peak_bytes"]) >= 0 for r in rows)
    result = json.loads((tmp_path / "scaling.json").read_text())
    slopes = {e["axis"]: e for e in result["slopes"]}
    assert slopes.keys() == set(scaling.AXES)
    for e in slopes.values():
        assert math.isfinite(e["klayer_time"]) and math.isfinite(e["flops"])
    assert slopes["width"]["nominal"] == 2.0 and slopes["K"]["nominal"] == 1.0
    page = (tmp_path / "scaling.md").read_text()
    assert "| width |" in page and "cores" in page and "BLAS" in page
