"""Check a user's gradients against klayer's exact ones and rank the catalogued bugs.

The error of one tensor is its largest entry-wise difference, scaled by the size of that
tensor's exact gradient (by the largest gradient entry of the whole network when the
exact tensor is ~0, as ∂J/∂b_l under batch norm is):

    error_t = max_i |g_i - e_i| / scale_t,  scale_t = max_i |e_i|, or max_all |e| if that
                                            is below 1e-6 · max_all |e|

A tensor is right when error_t ≤ TOL (1e-5: float64 code agrees to ~1e-14, float32 code
to ~1e-6).

Ranking: each catalogued bug is planted in klayer's own backward pass on the same case,
which gives that bug's gradients g_b. The user's deviation D_u = g_u - e and the bug's
D_b = g_b - e are compared per tensor,

    d_t = ||D_u - D_b|| / (||D_u|| + ||D_b|| + TOL · scale_t · sqrt(size_t)),

0 when the two deviations coincide (both right, or wrong in the same way: same entries,
sizes and signs), 1 when one tensor is wrong and the other right or they point in
unrelated directions. A bug's distance is the mean of d_t over the tensors; the bug with
the smallest distance ranks first, and one whose gradients equal the user's to TOL
"explains them exactly".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from klayer.diagnose import bugs as B
from klayer.diagnose import case as C
from klayer.diagnose.metrics import TOL, scales, scaled_errors

NUMERIC_TOL = 1e-5  # a float64 centred difference (h = 1e-5) agrees to ~1e-9
SHOWN = 3  # likely bugs listed


def distance(user: dict, planted: dict, exact: dict) -> float:
    """Mean over tensors of d_t (module docstring): 0 = same error pattern, 1 = unrelated."""
    scale = scales(exact)
    total = 0.0
    for name, e in exact.items():
        du, db = user[name] - e, planted[name] - e
        floor = TOL * scale[name] * np.sqrt(e.size)
        total += float(np.linalg.norm(du - db) / (np.linalg.norm(du) + np.linalg.norm(db)
                                                  + floor))
    return total / len(exact)


def magnitude_distance(user: dict, planted: dict, exact: dict) -> float:
    """Mean over tensors of |log10 of the ratio of the two errors| / 3, capped at 1: for
    noise (float32), whose signs are random but whose size is not."""
    eu, ep = scaled_errors(user, exact), scaled_errors(planted, exact)
    return float(np.mean([min(1.0, abs(np.log10((eu[n] + 1e-14) / (ep[n] + 1e-14))) / 3)
                          for n in exact]))


def rank_analytic(case, user: dict, exact: dict) -> list[dict]:
    """Every analytic bug with its distance to the user's gradients, closest first."""
    out = []
    for bug in B.visible_bugs(case):  # (l2-factor cannot explain anything when λ = 0)
        planted = B.planted_gradients(case, bug)
        out.append(_entry(bug, distance(user, planted, exact),
                          max(scaled_errors(user, planted).values()) <= TOL))
    return sorted(out, key=lambda r: r["distance"])


def rank_numerical(case, user_numeric: dict, exact: dict) -> list[dict]:
    """Every numerical bug that makes a numeric gradient wrong, closest first."""
    out = []
    for bug in B.NUMERICAL:
        if bug == "bn-bias-false-alarm":
            continue  # a correct numeric gradient: see false_alarms
        best = None
        for variant, planted in B.planted_numeric(case, bug):
            d = distance(user_numeric, planted, exact)
            if bug == "float32-numeric":
                d = min(d, magnitude_distance(user_numeric, planted, exact))
            exact_match = max(scaled_errors(user_numeric, planted).values()) <= NUMERIC_TOL
            if best is None or d < best[0]:
                best = (d, exact_match, variant)
        entry = _entry(bug, best[0], best[1])
        if best[2]:
            entry["variant"] = best[2]
        out.append(entry)
    return sorted(out, key=lambda r: r["distance"])


def false_alarms(case, user: dict, user_numeric: dict) -> list[str]:
    """Biases feeding batch norm whose analytic and numeric gradients are both ~0 (right)
    but whose relative error |a - n| / (|a| + |n|) is large: the bn-bias-false-alarm."""
    top = max(float(np.abs(g).max()) for g in user_numeric.values())
    names = []
    for l in range(1, case.k):
        a, n = user[f"b{l}"], user_numeric[f"b{l}"]
        small = max(np.abs(a).max(), np.abs(n).max()) <= 1e-6 * top
        rel = np.max(np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), 1e-300))
        if small and rel > 1e-3:
            names.append(f"b{l}")
    return names


def _entry(bug: str, d: float, exact_match: bool) -> dict:
    b = B.BUGS[bug]
    return {"bug": bug, "kind": b.kind, "distance": round(float(d), 4),
            "explains_exactly": bool(exact_match), "title": b.title, "symptom": b.symptom,
            "breaks": b.breaks, "fix": b.fix, "explanation": b.explanation}


@dataclass(repr=False)
class Diagnosis:
    """What :func:`check` found: ``verdict`` "correct" or "wrong"; ``likely``, the
    catalogued bugs closest to the user's gradients (empty when correct); ``tensors``,
    per tensor its shape, error and status; ``numeric`` (with a numerical gradient),
    the same about it."""

    verdict: str
    likely: list
    tensors: dict
    numeric: dict | None = None
    case_summary: str = ""
    ranking: list = field(default_factory=list)  # every analytic bug, closest first

    def as_dict(self) -> dict:
        out = {"verdict": self.verdict, "likely": self.likely, "tensors": self.tensors}
        if self.numeric is not None:
            out["numeric"] = self.numeric
        out["case"] = self.case_summary
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False)

    def __str__(self) -> str:
        return render(self, markdown=False)

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        return render(self, markdown=True)


def check(case, grads, numeric=None) -> Diagnosis:
    """Diagnose the gradients ``grads`` of ``case`` (each a path to .npz/.mat or a dict).

    ``numeric``: the user's numerical gradients too (same keys); then the numerical
    check itself is diagnosed (checker bugs, the bn-bias false alarm).
    Raises :class:`klayer.nn.errors.UserError` for unusable input.
    """
    if not isinstance(case, C.Case):
        case = C.case_from_arrays(C.as_dict(case, "CASE"), "CASE")
    user = C.grads_to_core(case, C.as_dict(grads, "GRADS"), "GRADS")
    user_numeric = None
    if numeric is not None:
        user_numeric = C.grads_to_core(case, C.as_dict(numeric, "NUMGRADS"), "NUMGRADS")
    exact = case.exact_gradients()
    errors = scaled_errors(user, exact)
    tensors = {}
    for name in case.names:
        tensors[name] = {"shape": list(C.expected_shape(case, name)), "error": errors[name],
                         "status": "right" if errors[name] <= TOL else "wrong",
                         "max_abs_exact": float(np.abs(exact[name]).max())}
    wrong = [n for n in case.names if tensors[n]["status"] == "wrong"]
    verdict = "wrong" if wrong else "correct"
    ranking = rank_analytic(case, user, exact) if wrong else []
    likely = ranking[:SHOWN]
    numeric_part = None
    if user_numeric is not None:
        nerr = scaled_errors(user_numeric, exact)
        for name in case.names:
            tensors[name]["numeric_error"] = nerr[name]
        nwrong = [n for n in case.names if nerr[n] > NUMERIC_TOL]
        numeric_part = {"verdict": "wrong" if nwrong else "correct", "wrong": nwrong,
                        "likely": rank_numerical(case, user_numeric, exact)[:SHOWN]
                        if nwrong else []}
        alarms = false_alarms(case, user, user_numeric)
        if alarms:
            entry = _entry("bn-bias-false-alarm", 0.0, True)
            entry["tensors"] = alarms
            numeric_part["likely"].insert(0 if not nwrong else len(numeric_part["likely"]),
                                          entry)
    sizes = ",".join(str(m) for m in case.sizes[1:-1])
    summary = (f"{case.k}-layer case (hidden {sizes}), {len(case.y)} samples, "
               f"{case.layout} layout, λ = {case.lam:g}, ε = {case.eps:g}")
    return Diagnosis(verdict, likely, tensors, numeric_part, summary, ranking)


# --- output ---------------------------------------------------------------------------------


def render(d: Diagnosis, markdown: bool) -> str:
    lines = [f"**{d.case_summary}**" if markdown else d.case_summary, ""]
    has_numeric = d.numeric is not None
    head = ["tensor", "shape", "error", "status"] + (["numeric error"] if has_numeric else [])
    rows = []
    for name, t in d.tensors.items():
        row = [name, "×".join(map(str, t["shape"])), f"{t['error']:.1e}", t["status"]]
        if has_numeric:
            row.append(f"{t['numeric_error']:.1e}")
        rows.append(row)
    lines += _table(head, rows, markdown)
    lines.append("")
    wrong = [n for n, t in d.tensors.items() if t["status"] == "wrong"]
    if d.verdict == "correct":
        lines.append(f"verdict: correct (every tensor within {TOL:g} of klayer's exact gradient)")
        biases = [f"b{l}" for l in range(1, len(d.tensors)) if f"gamma{l}" in d.tensors]
        lines.append(f"note: {', '.join(biases)} feed batch norm, so their exact gradient is 0; "
                     "a relative error of ~1 there in your own check is a false alarm "
                     "(bn-bias-false-alarm)")
    else:
        lines.append(f"verdict: wrong ({', '.join(wrong)} differ from klayer's exact gradient)")
        lines += ["", "likely bugs, closest first:"]
        lines += _likely(d.likely, markdown)
        if d.likely and d.likely[0]["distance"] > 0.5:
            lines += ["", "none of the catalogued bugs explains the pattern well "
                          "(best distance > 0.5): maybe two bugs at once, or another one"]
    if has_numeric:
        n = d.numeric
        lines.append("")
        if n["verdict"] == "correct":
            lines.append(f"your numerical gradient: correct (within {NUMERIC_TOL:g})")
        else:
            lines.append(f"your numerical gradient: wrong ({', '.join(n['wrong'])}); "
                         "likely checker bugs, closest first:")
        if n["likely"]:
            lines += _likely(n["likely"], markdown)
    return "\n".join(lines)


def _likely(entries, markdown) -> list[str]:
    lines = []
    for i, e in enumerate(entries, 1):
        how = "explains it exactly" if e["explains_exactly"] else f"distance {e['distance']:.2f}"
        extra = f", {e['variant']}" if e.get("variant") else ""
        if e.get("tensors"):
            extra += f", on {', '.join(e['tensors'])}"
        ident = f"`{e['bug']}`" if markdown else e["bug"]
        lines.append(f"{i}. {ident} ({how}{extra}): {e['title']}")
        pad = "   "
        lines.append(f"{pad}breaks: {e['breaks']}")
        lines.append(f"{pad}fix: {e['fix']}")
        lines.append(f"{pad}{e['explanation']}")
    return lines


def _table(head, rows, markdown) -> list[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
               ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip()] + [fmt.format(*r).rstrip() for r in rows]
