"""``klayer export RUN --format onnx|torch``: a trained run for other runtimes.

ONNX needs the ``onnx`` package (``pip install "klayer[onnx]"``); the PyTorch state dict
needs torch (``pip install torch==2.13.0``). Neither is needed by klayer otherwise, so
both are imported here, only when asked for. See :mod:`klayer.export` for what the files
hold, and docs/export.md ("Using a trained model elsewhere") for how to run them.
"""

from __future__ import annotations

import io
from pathlib import Path

from klayer.nn.errors import UserError

FORMATS = {"onnx": "model.onnx", "torch": "model.pt"}


def register(subparsers) -> None:
    from klayer.export import INPUT_DTYPES, INPUT_LAYOUTS

    p = subparsers.add_parser(
        "export", help="write a trained run as ONNX or a PyTorch state dict",
        description="Write the model of a trained run as an ONNX graph or a PyTorch state "
                    "dict that takes raw pixels (0..255) and gives class probabilities; "
                    "standardisation and batch-norm statistics are inside. Also writes "
                    "RUN/MODEL.md if the run has none.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or its model.npz)")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx",
                   help="onnx (default) or torch")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="output file (default RUN/model.onnx or RUN/model.pt)")
    p.add_argument("--input-layout", choices=INPUT_LAYOUTS, default="planes",
                   help="ONNX input shape: planes = (n, 3072) in CIFAR-10's layout (red, "
                        "green, blue planes; default), hwc = (n, 32, 32, 3) images")
    p.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float32",
                   help="ONNX input type: float32 (default) or uint8")
    p.set_defaults(handler=run)


def run(args) -> int:
    import klayer
    from klayer import export, runs
    from klayer.model_card import CARD_FILE, write_model_card

    run_dir = args.run if args.run.is_dir() else args.run.parent
    out = args.out or run_dir / FORMATS[args.format]
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the file to write, e.g. "
                        f"{out / FORMATS[args.format]}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it first")
    if args.format == "torch" and (args.input_layout, args.input_dtype) != ("planes",
                                                                            "float32"):
        raise UserError("--input-layout and --input-dtype apply to --format onnx; the "
                        "PyTorch model takes float32 (n, 3072) pixels")
    model = klayer.load_model(args.run)
    net, standardizer, class_names = model.network, model.standardizer, model.class_names
    config = runs.read_config(run_dir) if (run_dir / runs.CONFIG_FILE).exists() else None

    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError('--format onnx needs the onnx package: pip install '
                            '"klayer[onnx]" (or pip install onnx)') from None
        proto = export.onnx_model(net, standardizer, class_names,
                                  input_layout=args.input_layout, input_dtype=args.input_dtype,
                                  config_hash=config.config_hash() if config else None)
        data = proto.SerializeToString()
        shape = "(n, 32, 32, 3)" if args.input_layout == "hwc" else f"(n, {net.input_size})"
        what = (f"ONNX opset {export.OPSET}: input pixels {args.input_dtype} {shape}, "
                f"output probabilities (n, {net.num_classes})")
    else:
        try:
            import torch
        except ImportError:
            raise UserError("--format torch needs PyTorch: pip install torch==2.13.0") from None
        state = {k: torch.from_numpy(v.copy())
                 for k, v in export.torch_state_dict(net, standardizer).items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        what = (f"PyTorch state dict of an nn.Sequential of {len(export.torch_layout(net))} "
                "modules (rebuild it as docs/export.md shows)")
    runs.atomic_write(out, lambda f: f.write(data))
    print(f"wrote {out} ({what})")
    if config is not None and not (run_dir / CARD_FILE).exists():
        print(f"wrote {write_model_card(run_dir, net, class_names)}")
    return 0
