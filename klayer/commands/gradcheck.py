"""``klayer gradcheck``: analytic against numerical gradients, as a Markdown table."""

from __future__ import annotations

from functools import partial

import numpy as np

from klayer.nn import checks
from klayer.nn import gradcheck as G
from klayer.data import cifar_problem
from klayer.nn.network import INITS, NORM_POSITIONS, Network
from klayer.commands import checked

_positive = partial(checks.number, strict=True)
_at_least_0 = partial(checks.integer, minimum=0)
_at_least_2 = partial(checks.integer, minimum=2)
_init = partial(checks.init, inits=INITS)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gradcheck",
        help="check every gradient against centred differences (float64)",
        description="Compare the analytic gradient of the cost with centred differences "
                    "(h = 1e-5, float64, batch norm in train mode) for every W, b, γ, β, "
                    "and print the per-layer table. Exit status 1 if any error exceeds the "
                    "tolerance.",
    )
    p.add_argument("--hidden", type=checked(checks.widths, "hidden", checks.parse_widths),
                   default=[50, 50], metavar="W1,W2,...",
                   help="hidden widths, comma-separated (default 50,50; 'none' for a "
                        "1-layer softmax)")
    bn = p.add_mutually_exclusive_group()
    bn.add_argument("--batch-norm", dest="batch_norm", action="store_true", default=True,
                    help="batch normalization in the hidden layers (default)")
    bn.add_argument("--no-batch-norm", dest="batch_norm", action="store_false")
    p.add_argument("--dims", type=checked(checks.integer, "dims", int), default=20,
                   help="input dimensions (default 20)")
    p.add_argument("--samples", type=checked(_at_least_2, "samples", int), default=20,
                   help="examples (default 20)")
    p.add_argument("--lambda", dest="lam", type=checked(checks.number, "lambda"),
                   default=0.01, help="L2 coefficient λ (default 0.01)")
    p.add_argument("--init", type=checked(_init, "init", str), default="he",
                   help="he, xavier or a number σ (default he)")
    p.add_argument("--seed", type=checked(_at_least_0, "seed", int), default=0,
                   help="seed of weights and inputs")
    p.add_argument("--tol", type=checked(_positive, "tol"), default=G.DEFAULT_TOL,
                   help=f"relative-error tolerance (default {G.DEFAULT_TOL:g})")
    p.add_argument("--abs-tol", type=checked(checks.number, "abs-tol"),
                   default=G.DEFAULT_ABS_TOL,
                   help="absolute-error tolerance for biases feeding batch norm "
                        f"(default {G.DEFAULT_ABS_TOL:g})")
    p.add_argument("--h", type=checked(_positive, "h"), default=G.DEFAULT_H,
                   help=f"finite-difference step (default {G.DEFAULT_H:g})")
    p.add_argument("--floor", type=checked(_positive, "floor"), default=G.DEFAULT_FLOOR,
                   help=f"floor of the relative error's denominator (default "
                        f"{G.DEFAULT_FLOOR:g})")
    p.add_argument("--order", type=int, choices=(2, 4), default=2,
                   help="centred differences of order 2 (default) or 4 (truncation error "
                        "h⁴ instead of h², twice the cost evaluations)")
    x = p.add_argument_group("beyond the study")
    x.add_argument("--layer-norm", action="store_true",
                   help="layer norm instead of batch norm (implies --no-batch-norm)")
    x.add_argument("--norm-position", choices=NORM_POSITIONS, default="before",
                   help="normalise before the ReLU (default) or after it")
    x.add_argument("--residual", action="store_true",
                   help="residual connections between hidden layers of equal width")
    x.add_argument("--dropout", type=checked(checks.fraction, "dropout"), default=0.0,
                   metavar="P", help="dropout probability (one fixed mask, seed 0)")
    x.add_argument("--label-smoothing", type=checked(checks.fraction, "label-smoothing"),
                   default=0.0, metavar="ε")
    p.add_argument("--cifar", action="store_true",
                   help="use the first SAMPLES CIFAR-10 training images (first DIMS "
                        "standardised dimensions) instead of random inputs")
    p.add_argument("--data-dir", type=checked(checks.path, "data-dir", str), help="CIFAR-10 folder (default: KLAYER_DATA, then the cache)")
    p.set_defaults(handler=run)


def run(args) -> int:
    X, y, source = inputs(args)
    batch_norm = args.batch_norm and not args.layer_norm
    options = {"layer_norm": args.layer_norm, "norm_position": args.norm_position,
               "residual": args.residual, "dropout": args.dropout,
               "label_smoothing": args.label_smoothing}
    rows = G.check_gradients_for(
        args.hidden, X, y, batch_norm=batch_norm, lam=args.lam, init=args.init,
        seed=args.seed, h=args.h, tol=args.tol, abs_tol=args.abs_tol, floor=args.floor,
        options=options, order=args.order)
    k = len(args.hidden) + 1
    norm = "batch norm" if batch_norm else "layer norm" if args.layer_norm else "no normalization"
    extras = [f"{norm}{' after the ReLU' if args.norm_position == 'after' and norm != 'no normalization' else ''}"]
    extras += ["residual"] if args.residual else []
    extras += [f"dropout {args.dropout:g} (fixed mask)"] if args.dropout else []
    extras += [f"label smoothing {args.label_smoothing:g}"] if args.label_smoothing else []
    extras += [f"order-{args.order} differences"] if args.order != 2 else []
    title = (f"{k}-layer network, {', '.join(extras)}, hidden {args.hidden or 'none'}, "
             f"{args.samples} samples × {args.dims} dims ({source}), λ = {args.lam:g}")
    print(G.markdown_table(rows, title))
    failed = [r.name for r in rows if not r.passed]
    print()
    if failed:
        print(f"FAILED: {', '.join(failed)} above tolerance")
        net = Network(X.shape[1], args.hidden, batch_norm=batch_norm, init=args.init,
                      dtype="float64", seed=args.seed, **options)
        margin = G.relu_margin(net, X, net.dropout_masks(len(X), np.random.default_rng(0)))
        if margin < G.KINK_MARGIN:
            print(f"note: a ReLU input is only {margin:.1e} from 0 here, where centred "
                  "differences measure no derivative (a kink); try another --seed before "
                  "suspecting the code")
        return 1
    print(f"passed: every error within tolerance (relative ≤ {args.tol:g}, floor "
          f"{args.floor:g}; absolute ≤ {args.abs_tol:g})")
    return 0


def inputs(args):
    """(X, y, description) for the check: random normal inputs or CIFAR-10 images."""
    if not args.cifar:
        X, y = G.random_problem(args.dims, args.samples, seed=args.seed)
        return X, y, "random normal inputs"
    X, y = cifar_problem(args.dims, args.samples, args.data_dir)
    return X, y, "CIFAR-10 training images"
