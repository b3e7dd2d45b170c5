"""``klayer diagnose``: is my batch-norm gradient right, and if not, which bug is it?"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from klayer.nn import checks
from klayer.commands import checked

MODEL = """\
the model (both layouts compute the same function):
  layers l = 1..k-1:  s_l = W_l x_{l-1} + b_l
                      ŝ_l = (s_l - μ_l) / sqrt(v_l + ε)   μ_l, v_l: the batch mean and the
                                                          biased (1/n) batch variance
                      s̃_l = γ_l ⊙ ŝ_l + β_l,   x_l = max(0, s̃_l)
  layer k:            s_k = W_k x_{k-1} + b_k,   P = softmax(s_k)
  cost:               J = (1/n) Σ_i -log P[y_i, i] + λ Σ_l ||W_l||²   (no penalty on b, γ, β)

layouts:
  columns (DD2424):  X is d×n, Y is K×n, W_l is m_l×m_{l-1}, b_l, γ_l, β_l are m_l×1,
                     s = W x + b for each column x
  rows (cs231n):     X is n×d, Y is n×K, W_l is m_{l-1}×m_l, b_l, γ_l, β_l are 1×m_l,
                     s = x W + b for each row x

the case file holds X, Y (one-hot), y (0-based labels), W1..Wk, b1..bk, gamma1..gamma{k-1},
beta1..beta{k-1}, lam (λ), eps (ε) and layout. Compute the gradients of J at these
parameters, on all n examples at once, with batch norm in training mode, and save them
under the same names (W1, b1, gamma1, beta1, ...) for `klayer diagnose check`."""

ACTIONS = """\
actions (klayer diagnose ACTION --help for each):
  make-case CASE [--hidden 8,6] [--dims D] [--samples N] [--classes K] [--lambda L]
            [--eps E] [--layout columns|rows] [--seed S]
  check CASE GRADS [--numeric NUMGRADS] [--json]
  table FILE.md [--json]

steps: klayer diagnose make-case case.npz; your code writes its gradients on that case to
grads.npz (W1, b1, gamma1, beta1, ...); klayer diagnose check case.npz grads.npz"""

_at_least_0 = partial(checks.integer, minimum=0)
_at_least_3 = partial(checks.integer, minimum=3)
_at_least_2 = partial(checks.integer, minimum=2)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="say which batch-norm gradients are wrong and which classic bug likely did it",
        description="Check your own batch-norm network's gradients: make a small case, "
                    "compute your gradients on it, and let klayer compare them with its exact "
                    "ones and rank the catalogued bugs (docs/diagnose.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ACTIONS,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    m = sub.add_parser(
        "make-case", help="write a small batch-norm problem to .npz (or .mat)",
        description="Write a small problem on which every catalogued bug shows: γ ≠ 1, "
                    "β ≠ 0, a small batch, λ > 0, features of very different variances, "
                    "no ReLU input near 0. .mat needs SciPy (pip install 'klayer[mat]').",
        epilog=MODEL, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("case", metavar="CASE", help="output file, .npz or .mat")
    m.add_argument("--hidden", type=checked(checks.widths, "hidden", checks.parse_widths),
                   default=(8, 6), metavar="W1,W2,...", help="hidden widths (default 8,6)")
    m.add_argument("--dims", type=checked(checks.integer, "dims", int), default=10,
                   metavar="D", help="input dimensions d (default 10)")
    m.add_argument("--samples", type=checked(_at_least_3, "samples", int), default=8,
                   metavar="N", help="examples n (default 8; small, so 1/n and 1/(n-1) differ)")
    m.add_argument("--classes", type=checked(_at_least_2, "classes", int), default=4,
                   metavar="K", help="classes K (default 4)")
    m.add_argument("--lambda", dest="lam", type=checked(checks.number, "lambda"),
                   default=0.1, metavar="L",
                   help="L2 coefficient λ (default 0.1; with 0 the l2-factor bug cannot show)")
    m.add_argument("--eps", type=checked(partial(checks.number, strict=True), "eps"),
                   default=1e-5, help="batch-norm ε (default 1e-5)")
    m.add_argument("--layout", choices=("columns", "rows"), default="columns",
                   help="columns: X d×n, W m×d (DD2424); rows: X n×d, W d×m (cs231n); "
                        "default columns")
    m.add_argument("--seed", type=checked(_at_least_0, "seed", int), default=0, metavar="S",
                   help="first seed tried (default 0)")
    m.set_defaults(handler=run_make_case)

    c = sub.add_parser(
        "check", help="compare your gradients with klayer's exact ones and rank the bugs",
        description="Compare the gradients in GRADS (keys W1, b1, gamma1, beta1, ...; vectors "
                    "as columns, rows or 1-D) with klayer's exact gradient of CASE; print a "
                    "table per tensor, the verdict and the likely bugs. Exit status 0: "
                    "correct, 1: wrong, 2: unusable input.",
        epilog=MODEL, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("case", metavar="CASE", help="the case file (.npz or .mat)")
    c.add_argument("grads", metavar="GRADS", help="your analytic gradients (.npz or .mat)")
    c.add_argument("--numeric", metavar="NUMGRADS",
                   help="your numerical gradients too: diagnoses the finite-difference check")
    c.add_argument("--json", action="store_true",
                   help="print the diagnosis as JSON ({verdict, likely, tensors, ...})")
    c.set_defaults(handler=run_check)

    t = sub.add_parser(
        "table", help="which bugs fit a Markdown table of per-layer relative errors",
        description="Read the Markdown tables of per-layer relative errors in FILE (rows: "
                    "layers from the first; columns naming W, b, beta, gamma) and list the "
                    "catalogued bugs that give the same pattern of right (≤ 1e-6) and "
                    "wrong (≥ 1e-3) cells in a network of that depth.")
    t.add_argument("file", metavar="FILE.md")
    t.add_argument("--json", action="store_true", help="print the results as JSON")
    t.set_defaults(handler=run_table)


def run_make_case(args) -> int:
    from klayer.diagnose import case as C

    case = C.make_case(args.hidden, args.dims, args.samples, args.classes, args.lam,
                       args.layout, args.seed, args.eps)
    C.save(args.case, C.case_arrays(case))
    sizes = ",".join(map(str, case.sizes[1:-1]))
    print(f"wrote {args.case}: {case.k}-layer case, hidden {sizes}, d = {case.sizes[0]}, "
          f"n = {len(case.y)}, K = {case.num_classes}, λ = {case.lam:g}, ε = {case.eps:g}, "
          f"{case.layout} layout")
    print("compute your gradients of J on it (batch norm in training mode), save them as "
          f"W1, b1, gamma1, beta1, ... and run: klayer diagnose check {args.case} GRADS")
    return 0


def run_check(args) -> int:
    from klayer.diagnose import check

    d = check(args.case, args.grads, args.numeric)
    print(d.to_json() if args.json else str(d))
    return 0 if d.verdict == "correct" else 1


def run_table(args) -> int:
    import json

    from klayer.diagnose import table as T

    text, results = T.explain(T.read(Path(args.file)))
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(text, end="")
    return 0
