"""Which catalogued bugs fit a reported table of per-layer relative errors.

A gradient-check table (one row per layer, columns for W, b, β, γ) reports for each
tensor max_i |a_i - n_i| / max(δ, |a_i| + |n_i|), a the analytic and n the numerical
gradient, with a tiny δ. Each cell is read as right (≤ 1e-6), wrong (≥ 1e-3) or unclear
(in between). For each catalogued bug, klayer builds a network of the table's depth, plants
the bug (in the analytic gradient, or in the numerical one for a checker bug), computes
the same table and reads it the same way; the bug is consistent when every cell that is
right or wrong in the report is so in the simulation (an unclear simulated cell fits
no definite reported one). Two states are simulated: at
initialisation (γ = 1, β = 0, b = 0, as a check right after building the network) and
after training has moved them (γ ≠ 1, β ≠ 0); a bug consistent in either is listed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klayer.diagnose import bugs as B
from klayer.diagnose.case import Case, make_case
from klayer.nn.errors import UserError

RIGHT, WRONG = 1e-6, 1e-3
FLOOR = 1e-15  # the δ of a student's relative error: tiny
_COLUMNS = {"w": "W", "b": "b", "beta": "beta", "β": "beta", "gamma": "gamma", "γ": "gamma"}


@dataclass
class Table:
    title: str
    layers: list[str]  # the row labels as written ("Layer 0", ...)
    cells: dict  # (row index, param) -> float


def parse(text: str) -> list[Table]:
    """Every Markdown table in ``text`` whose header names W (and b, β, γ) columns."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and i + 1 < len(lines) and \
                re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", lines[i + 1].strip()):
            header = _cells(line)
            params = [_param(h) for h in header]
            title = _title(lines, i)
            rows, j = [], i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            if "W" in params:
                tables.append(_table(title, params, rows))
            i = j
        else:
            i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _param(header: str) -> str | None:
    words = re.findall(r"[A-Za-zβγ]+", header.lower())
    for w in reversed(words):
        if w in _COLUMNS:
            return _COLUMNS[w]
    return None


def _title(lines, i) -> str:
    for j in range(i - 1, max(-1, i - 4), -1):
        if lines[j].strip():
            return lines[j].strip().strip("*#: ")
    return ""


def _table(title, params, rows) -> Table:
    cells, layers = {}, []
    for r, row in enumerate(rows):
        layers.append(row[0] if row else str(r))
        for param, text in zip(params, row):
            if param is None or not text.strip():
                continue
            try:
                cells[(r, param)] = float(text.replace("**", "").split()[0])
            except (ValueError, IndexError):
                raise UserError(f"table {title!r}: cannot read {text!r} as a number "
                                f"(row {row[0]!r})") from None
    return Table(title, layers, cells)


def classify(value: float) -> str:
    return "right" if value <= RIGHT else "wrong" if value >= WRONG else "unclear"


def _relative(a, n) -> float:
    return float(np.max(np.abs(a - n) / np.maximum(FLOOR, np.abs(a) + np.abs(n))))


def simulate(case: Case, bug: str | None) -> dict:
    """{(layer, param): relative error} of analytic against numeric with ``bug`` planted."""
    if bug is None or bug in B.ANALYTIC:
        analytic = B.planted_gradients(case, bug)
        numeric = B.numeric(case, bug=bug if bug in B.FORWARD_BUGS else None)
    else:
        analytic = B.planted_gradients(case)
        if bug == "step-too-large":
            numeric = B.numeric(case, 1e-2)
        elif bug == "float32-numeric":
            numeric = B.numeric(case, 1e-5, "float32")
        else:
            numeric = B.planted_numeric(case, bug)[0][1]
    out = {}
    for name in case.names:
        param = name.rstrip("0123456789")
        out[(int(name[len(param):]), param)] = _relative(analytic[name], numeric[name])
    return out


def states(k: int, seed: int = 0) -> dict:
    """The two simulated networks of depth k: at initialisation and after training."""
    hidden = [8] * (k - 1)
    trained = make_case(hidden, dims=10, samples=10, classes=5, lam=0.01, seed=seed)
    init = Case(trained.X, trained.y, {n: v.copy() for n, v in trained.params.items()},
                trained.lam, trained.eps)
    for l in range(1, k):
        init.params[f"b{l}"][:] = 0
        init.params[f"gamma{l}"][:] = 1
        init.params[f"beta{l}"][:] = 0
    init.params[f"b{k}"][:] = 0
    return {"at initialisation (γ = 1, β = 0)": init, "after training (γ ≠ 1, β ≠ 0)": trained}


@functools.lru_cache(maxsize=8)
def simulations(k: int) -> dict:
    """{state: {bug (None: no bug): simulated table}} for a network of depth k."""
    return {name: {bug: simulate(case, bug) for bug in [None, *B.ANALYTIC, *B.NUMERICAL]}
            for name, case in states(k).items()}


def consistent(table: Table, simulated: dict) -> bool:
    k = len(table.layers)
    for (r, param), value in table.cells.items():
        seen = classify(value)
        if seen == "unclear":
            continue
        sim = simulated.get((r + 1, param))
        if sim is None:
            return False
        if classify(sim) != seen:
            return False
    return k > 0


def diagnose(table: Table) -> dict:
    """The bugs consistent with ``table``, with the state in which they are and the
    simulated errors; also whether a correct implementation fits it."""
    k = len(table.layers)
    if k < 2:
        raise UserError(f"table {table.title!r} has {k} layer row(s); a batch-norm network "
                        "has at least 2")
    sims = simulations(k)
    fits = []
    for bug in [None, *B.ANALYTIC, *B.NUMERICAL]:
        where = [name for name in sims if consistent(table, sims[name][bug])]
        if where:
            fits.append({"bug": bug or "none", "states": where,
                         "simulated": {f"{p}{l}": v for (l, p), v in sims[where[0]][bug].items()}})
    result = {"title": table.title, "layers": k, "consistent": fits,
              "pattern": _pattern(table)}
    result["by_size"] = by_size(table, [f["bug"] for f in fits if f["bug"] != "none"])
    return result


# --- sizes ------------------------------------------------------------------------------------
#
# The entry-wise max with a tiny floor saturates at ~1 on any network of realistic width
# (some entry is always near 0), so reported wrong values well below 1 (0.3, 0.5) come from
# a norm-wise relative error ||a - n|| / (||a|| + ||n||). Its size does depend on the bug,
# so the consistent bugs are also ranked by how close their simulated norm-wise errors come
# to the reported ones, on networks of the table's depth and a course's check size (hidden
# width 50, 20 input dimensions, 10 examples, at initialisation, three seeds).

SIZE_SEEDS = (0, 1, 2)


def norm_relative(a, n) -> float:
    return float(np.linalg.norm(a - n) / max(FLOOR, np.linalg.norm(a) + np.linalg.norm(n)))


@functools.lru_cache(maxsize=64)
def _size_errors(k: int, bug: str) -> dict:
    """{(layer, param): geometric mean over SIZE_SEEDS of the norm-wise relative error}."""
    from klayer.nn.network import Network

    logs = {}
    for seed in SIZE_SEEDS:
        rng = np.random.default_rng(seed)
        X, y = rng.standard_normal((10, 20)), rng.integers(0, 10, 10)
        net = Network(20, [50] * (k - 1), 10, dtype="float64", seed=seed)
        case = Case(X, y, net.params, 0.0, net.bn_eps)
        if bug in B.ANALYTIC:
            analytic = B.planted_gradients(case, bug)
            numeric = B.numeric(case, bug=bug) if bug in B.FORWARD_BUGS \
                else case.exact_gradients()
        elif bug == "numeric-with-running-stats":
            analytic, numeric = case.exact_gradients(), B.running_stats_gradients(case)
        else:
            return {}
        for name in case.names:
            param = name.rstrip("0123456789")
            key = (int(name[len(param):]), param)
            err = max(norm_relative(analytic[name], numeric[name]), 1e-16)
            logs[key] = logs.get(key, 0.0) + np.log10(err) / len(SIZE_SEEDS)
    return {key: float(10 ** v) for key, v in logs.items()}


def by_size(table: Table, bugs: list[str]) -> list[dict]:
    """The bugs in ``bugs`` ranked by the distance (mean |log10 ratio|) between their
    simulated norm-wise errors and the reported wrong values below 0.99 (biases feeding
    batch norm left out: their true gradient is 0). Empty when no such value is reported."""
    k = len(table.layers)
    reported = {(r + 1, p): v for (r, p), v in table.cells.items()
                if WRONG <= v < 0.99 and not (p == "b" and r + 1 < k)}
    if not reported:
        return []
    ranked = []
    for bug in bugs:
        sim = _size_errors(k, bug)
        if not sim or min(sim[key] for key in reported) < 1e-9:
            continue  # a checker bug without a fixed size, or invisible at initialisation
        dist = float(np.mean([abs(np.log10(sim[key] / v)) for key, v in reported.items()]))
        ranked.append({"bug": bug, "distance": round(dist, 3),
                       "simulated": {f"{p}{l}": round(sim[(l, p)], 3) for (l, p) in reported},
                       "reported": {f"{p}{l}": v for (l, p), v in reported.items()}})
    return sorted(ranked, key=lambda r: r["distance"])


def _pattern(table: Table) -> dict:
    return {f"{p}{r + 1}": classify(v) for (r, p), v in sorted(table.cells.items())}


def explain(text: str) -> tuple[str, list[dict]]:
    """The report of ``klayer diagnose table`` for Markdown ``text``, and the results."""
    tables = parse(text)
    if not tables:
        raise UserError("no Markdown table with a W column found; expected rows like "
                        "'| Layer 1 | 1e-9 | ... |' under a header naming W, b, beta, gamma")
    results, lines = [], []
    for t in tables:
        if not any(p in ("gamma", "beta") for (_, p) in t.cells):
            lines += [f"## {t.title or 'table'}", "", "no β or γ column: not a batch-norm "
                      "network; skipped", ""]
            continue
        res = diagnose(t)
        results.append(res)
        lines += [f"## {t.title or 'table'}", "",
                  f"{res['layers']} layers; read as (layer numbered from 1, top row = layer 1):"]
        by_class = {}
        for name, c in res["pattern"].items():
            by_class.setdefault(c, []).append(name)
        for c in ("wrong", "unclear", "right"):
            if by_class.get(c):
                lines.append(f"  {c}: {', '.join(by_class[c])}")
        names = [f["bug"] for f in res["consistent"]]
        lines.append("")
        if "none" in names:
            lines.append("a correct implementation fits this table")
        bugs_ = [f for f in res["consistent"] if f["bug"] != "none"]
        if not bugs_:
            lines.append("no catalogued bug fits this pattern on its own")
        else:
            lines.append("consistent with:")
            for f in bugs_:
                b = B.BUGS[f["bug"]]
                lines.append(f"  {f['bug']} ({b.kind}; {' and '.join(f['states'])}): {b.title}")
        if res["by_size"]:
            lines += ["", "by size: the reported wrong values lie below 1, as a norm-wise relative "
                          "error ||a - n|| / (||a|| + ||n||) gives them; simulated with it "
                          "(width 50, 20 dims, 10 examples, at initialisation), closest first:"]
            for r in res["by_size"]:
                pairs = ", ".join(f"{name} {r['simulated'][name]:.2f} vs {r['reported'][name]:g}"
                                  for name in r["simulated"])
                lines.append(f"  {r['bug']} (distance {r['distance']:.2f}): {pairs}")
        alarm = [n for n, c in res["pattern"].items()
                 if re.fullmatch(r"b\d+", n) and c == "wrong" and int(n[1:]) < res["layers"]]
        if alarm:
            verb = "feeds" if len(alarm) == 1 else "feed"
            lines.append(f"note: {', '.join(alarm)} {verb} batch norm, whose true gradient is 0: "
                         "a relative error of ~1 there is what correct code shows too "
                         "(bn-bias-false-alarm) and says nothing")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n", results


def read(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file {path}")
    return path.read_text(encoding="utf-8")
