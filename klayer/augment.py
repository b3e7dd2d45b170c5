"""On-the-fly data augmentation of mini-batches: flips, translations, photometric jitter.

Works on standardised CIFAR-10 rows (n, 3072) laid out as the dataset stores them,
channel-major (3, 32, 32). Every transformation is drawn per image from the generator it
is given, vectorised over the mini-batch (one gather for the translations, one for
the flips), and returns a new array: the training set itself is never changed.

- flip: mirror each image left-right with probability 1/2.
- translate t: shift each image by (dy, dx), each uniform in {-t, ..., t} pixels; the
  pixels shifted in are 0, which after standardisation is the training mean of that pixel.
- jitter j: per image, contrast c ~ U(1 - j, 1 + j) and brightness b ~ U(-j, j) (in
  standard deviations): x -> c x + b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    translate: int = 0
    jitter: float = 0.0
    image_shape: tuple = IMAGE_SHAPE

    def __post_init__(self):
        if isinstance(self.translate, bool) or not isinstance(self.translate, (int, np.integer)) \
                or not 0 <= self.translate < min(self.image_shape[1:]):
            raise ValueError(f"translate must be a whole number of pixels in "
                             f"[0, {min(self.image_shape[1:])}), got {self.translate!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")

    @property
    def active(self) -> bool:
        return bool(self.flip or self.translate or self.jitter)

    @property
    def input_size(self) -> int:
        return int(np.prod(self.image_shape))

    def describe(self) -> str:
        parts = (["flips"] if self.flip else []) \
            + ([f"translations ±{self.translate} px"] if self.translate else []) \
            + ([f"jitter {self.jitter:g}"] if self.jitter else [])
        return ", ".join(parts) or "none"

    def __call__(self, X, rng) -> np.ndarray:
        """Augmented copy of X: (n, C·H·W); draws from ``rng`` in a fixed order."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.input_size:
            raise ValueError(f"augmentation works on images of shape {self.image_shape}: X "
                             f"must be (n, {self.input_size}), got {X.shape}")
        if not self.active:
            return X.copy()
        n = len(X)
        C, H, W = self.image_shape
        images = X.reshape(n, C, H, W)
        t = self.translate
        if t:
            # Each image's (dy, dx) picks one H × W window of its zero-padded copy:
            # a strided view of all windows, then one gather (the fastest of the
            # vectorised forms tried: 4.4 ms for 256 float32 images, where np.take
            # with a flat index array took 16 ms).
            padded = np.zeros((n, C, H + 2 * t, W + 2 * t), X.dtype)
            padded[:, :, t:t + H, t:t + W] = images
            dy, dx = rng.integers(0, 2 * t + 1, size=(2, n))
            windows = sliding_window_view(padded, (H, W), axis=(2, 3))
            out = windows[np.arange(n), :, dy, dx]  # (n, C, H, W), a new array
        else:
            out = images.copy()
        if self.flip:
            flipped = rng.random(n) < 0.5
            out[flipped] = out[flipped][..., ::-1]
        out = out.reshape(n, C * H * W)
        if self.jitter:
            j = self.jitter
            contrast = rng.uniform(1 - j, 1 + j, size=(n, 1)).astype(X.dtype)
            brightness = rng.uniform(-j, j, size=(n, 1)).astype(X.dtype)
            out *= contrast
            out += brightness
        return out


def from_config(config) -> Augmentation:
    """The augmentation a :class:`klayer.config.TrainConfig` asks for."""
    return Augmentation(flip=config.flip, translate=config.translate, jitter=config.jitter)
