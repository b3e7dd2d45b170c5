"""``klayer predict RUN image.png ...``: classify 32×32 RGB images with a trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 32


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify images with a trained run",
        description="Classify 32x32 RGB images (PNG or any format Pillow reads) with the "
                    "model of a trained run; prints the class and its probability.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or its model.npz)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--resize", action="store_true",
                   help="resize images of another size to 32x32 (default: an error)")
    p.add_argument("--top", type=int, default=1, metavar="K", help="show the K likeliest classes")
    p.set_defaults(handler=run)


def run(args) -> int:
    import klayer

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    model = klayer.load_model(args.run)
    class_names = model.class_names
    pixels = np.stack([read_image(path, args.resize) for path in args.images])
    probs = model.predict_proba(pixels)
    for path, p in zip(args.images, probs):
        best = np.argsort(p)[::-1][:args.top]
        print(f"{path}: " + ", ".join(f"{class_names[c]} ({p[c]:.1%})" for c in best))
    return 0


def read_image(path: Path, resize: bool = False) -> np.ndarray:
    """An RGB image file -> (3072,) uint8 in CIFAR-10's layout (red, green, blue planes).

    Images with an alpha channel or a palette are converted to RGB; grayscale is refused.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not an image file Pillow can read ({exc})") from None
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        raise ValueError(f"{path} is a grayscale image (mode {image.mode}); klayer classifies "
                         "RGB images: convert it to RGB first")
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        if not resize:
            raise ValueError(f"{path} is {image.size[0]}x{image.size[1]} pixels; the model "
                             f"takes {SIZE}x{SIZE} images (pass --resize to scale it)")
        image = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    from klayer.model import to_planes

    return to_planes(np.asarray(image, dtype=np.uint8)[None])[0]  # from (32, 32, 3)
