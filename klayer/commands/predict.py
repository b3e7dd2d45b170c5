"""``klayer predict RUN image.png ...``: classify 32×32 RGB images with a trained run."""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np

from klayer.nn.errors import UserError

SIZE = 32
MAX_SIDE = 4096  # the largest image --resize accepts (a 4096x4096 RGB image is 48 MB)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify images with a trained run",
        description="Classify 32x32 RGB images (PNG or any format Pillow reads) with the "
                    "model of a trained run; prints the class and its probability.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or its model.npz)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--resize", action="store_true",
                   help=f"resize images of another size (up to {MAX_SIDE}x{MAX_SIDE}) to "
                        "32x32 (default: an error)")
    p.add_argument("--top", type=int, default=1, metavar="K", help="show the K likeliest classes")
    p.set_defaults(handler=run)


def run(args) -> int:
    import klayer

    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
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

    The size is checked from the file's header before any pixel is decoded: 32x32, or
    with ``resize`` at most MAX_SIDE x MAX_SIDE (scaled to 32x32), so a huge or crafted
    image (a decompression bomb) is refused without allocating it. Images with an alpha
    channel or a palette are converted to RGB; grayscale is refused.
    """
    from PIL import Image

    with _open_image(path) as image:
        width, height = image.size  # from the header: nothing decoded yet
        if (width, height) != (SIZE, SIZE) and not resize:
            raise UserError(f"{path} is {width}x{height} pixels; the model takes "
                            f"{SIZE}x{SIZE} images (pass --resize to scale it)")
        if width > MAX_SIDE or height > MAX_SIDE:
            raise UserError(f"{path} is {width}x{height} pixels, more than --resize accepts "
                            f"({MAX_SIDE}x{MAX_SIDE}): scale it down first")
        if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
            raise UserError(f"{path} is a grayscale image (mode {image.mode}); klayer "
                            "classifies RGB images: convert it to RGB first")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, zlib.error) as exc:  # what decoders raise
            raise UserError(f"{path}: the image data is corrupt or truncated ({exc})") from None
        image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    from klayer.model import to_planes

    return to_planes(np.asarray(image, dtype=np.uint8)[None])[0]  # from (32, 32, 3)


def _open_image(path: Path):
    """PIL's lazy open (reads the header only), with its decompression-bomb warning made
    an error and every failure a one-line UserError or FileNotFoundError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{path} is refused: too many pixels to decode safely ({exc}); "
                        f"klayer takes {SIZE}x{SIZE} images, or up to {MAX_SIDE}x{MAX_SIDE} "
                        "with --resize") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path} is not an image file Pillow can read ({exc})") from None
