"""``klayer gradcheck``: analytic against numerical gradients, as a Markdown table."""

from __future__ import annotations

import argparse

from klayer import gradcheck as G


def parse_sizes(text: str) -> list[int]:
    """"50,50" -> [50, 50]; "" or "none" -> [] (no hidden layer)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden must be comma-separated integers like 50,50, got {text!r}") \
            from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gradcheck",
        help="check every gradient against centred differences (float64)",
        description="Compare the analytic gradient of the cost with centred differences "
                    "(h = 1e-5, float64, batch norm in train mode) for every W, b, γ, β, "
                    "and print the per-layer table. Exit status 1 if any error exceeds the "
                    "tolerance.",
    )
    p.add_argument("--hidden", type=parse_sizes, default=[50, 50],
                   help="hidden widths, comma-separated (default 50,50; 'none' for a "
                        "1-layer softmax)")
    bn = p.add_mutually_exclusive_group()
    bn.add_argument("--batch-norm", dest="batch_norm", action="store_true", default=True,
                    help="batch normalization in the hidden layers (default)")
    bn.add_argument("--no-batch-norm", dest="batch_norm", action="store_false")
    p.add_argument("--dims", type=int, default=20, help="input dimensions (default 20)")
    p.add_argument("--samples", type=int, default=20, help="examples (default 20)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.01,
                   help="L2 coefficient λ (default 0.01)")
    p.add_argument("--init", default="he", help="he, xavier or a number σ (default he)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    p.add_argument("--tol", type=float, default=G.DEFAULT_TOL,
                   help=f"relative-error tolerance (default {G.DEFAULT_TOL:g})")
    p.add_argument("--abs-tol", type=float, default=G.DEFAULT_ABS_TOL,
                   help="absolute-error tolerance for biases feeding batch norm "
                        f"(default {G.DEFAULT_ABS_TOL:g})")
    p.add_argument("--h", type=float, default=G.DEFAULT_H, help="finite-difference step")
    p.add_argument("--floor", type=float, default=G.DEFAULT_FLOOR,
                   help=f"floor of the relative error's denominator (default "
                        f"{G.DEFAULT_FLOOR:g})")
    p.add_argument("--cifar", action="store_true",
                   help="use the first SAMPLES CIFAR-10 training images (first DIMS "
                        "standardised dimensions) instead of random inputs")
    p.add_argument("--data-dir", help="CIFAR-10 folder (default: KLAYER_DATA, then the cache)")
    p.set_defaults(handler=run)


def run(args) -> int:
    X, y, source = inputs(args)
    rows = G.check_gradients_for(
        args.hidden, X, y, batch_norm=args.batch_norm, lam=args.lam, init=args.init,
        seed=args.seed, h=args.h, tol=args.tol, abs_tol=args.abs_tol, floor=args.floor)
    k = len(args.hidden) + 1
    title = (f"{k}-layer network {'with' if args.batch_norm else 'without'} batch norm, "
             f"hidden {args.hidden or 'none'}, {args.samples} samples × {args.dims} dims "
             f"({source}), λ = {args.lam:g}")
    print(G.markdown_table(rows, title))
    failed = [r.name for r in rows if not r.passed]
    print()
    if failed:
        print(f"FAILED: {', '.join(failed)} above tolerance")
        return 1
    print(f"passed: every error within tolerance (relative ≤ {args.tol:g}, floor "
          f"{args.floor:g}; absolute ≤ {args.abs_tol:g})")
    return 0


def inputs(args):
    """(X, y, description) for the check: random normal inputs or CIFAR-10 images."""
    if args.dims < 1 or args.samples < 2:
        raise ValueError("--dims must be ≥ 1 and --samples ≥ 2")
    if not args.cifar:
        X, y = G.random_problem(args.dims, args.samples, seed=args.seed)
        return X, y, "random normal inputs"
    X, y = G.cifar_problem(args.dims, args.samples, args.data_dir)
    return X, y, "CIFAR-10 training images"
