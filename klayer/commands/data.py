"""``klayer data``: where CIFAR-10 is (or would be downloaded), verify it, summarise it."""

from __future__ import annotations

import argparse

from klayer import data

_SOURCES = {
    "data_dir": "from --data-dir",
    data.ENV_VAR: f"from ${data.ENV_VAR}",
    "cache": "the default cache; set --data-dir or $KLAYER_DATA to use another folder",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="locate, download and verify CIFAR-10; print class counts and channel stats",
        description=(
            "Say where CIFAR-10 is (looked for in --data-dir, else $KLAYER_DATA, else "
            "the user cache), download it if absent and allowed, read and validate all "
            "six batches, and print the images per class and the per-channel mean and "
            "std of the pixels in [0, 1]."
        ),
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder that holds (or is) cifar-10-batches-py"
    )
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download the official archive if the data is absent (default: yes)",
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    root, source = data.data_root(args.data_dir)
    print(f"data folder: {root} ({_SOURCES[source]})")
    absent = data.find_data_dir(args.data_dir) is None
    if absent and args.download and (source == "cache" or root.is_dir()):
        target = data.download_target(args.data_dir)
        print(f"CIFAR-10 not found; downloading {data.OFFICIAL_URL} to {target}")
    # DataError (exit 2) for a folder that does not exist, or absent data with --no-download
    folder = data.ensure_cifar10(args.data_dir, download=args.download, progress=True)
    print(f"CIFAR-10 batches: {folder}")
    batches = data.load_batches(folder)
    print(
        f"verified: {len(batches)} batches of {data.IMAGES_PER_BATCH} x {data.IMAGE_SIZE} "
        f"uint8 images, labels 0-{data.NUM_CLASSES - 1}"
    )
    print(format_summary(data.describe(batches)))
    return 0


def format_summary(summary: dict) -> str:
    """The tables of :func:`klayer.data.describe` as text."""
    splits = summary["splits"]
    names = list(splits)
    width = max(len(c) for c in summary["class_names"] + ["total"])
    lines = ["", f"{'class':<{width}}" + "".join(f"{s:>10}" for s in names)]
    for i, name in enumerate(summary["class_names"]):
        lines.append(f"{name:<{width}}" + "".join(f"{splits[s]['counts'][i]:>10}" for s in names))
    lines.append(f"{'total':<{width}}" + "".join(f"{splits[s]['n']:>10}" for s in names))
    header = "".join(f"{s + ' mean':>13}{s + ' std':>12}" for s in names)
    lines += ["", "pixels in [0, 1]" + header]
    for c, channel in enumerate(("R", "G", "B")):
        lines.append(
            f"{channel:<16}"
            + "".join(f"{splits[s]['mean'][c]:>13.4f}{splits[s]['std'][c]:>12.4f}" for s in names)
        )
    return "\n".join(lines)
