"""A trained model ready to classify raw pixels: ``klayer.load_model(run)``.

A run folder holds the network, the standardisation statistics of its training images
and the class names (see :mod:`klayer.modelfile`). :class:`LoadedModel` keeps the three
together, so that callers hand it pixels as they come from an image file or from
CIFAR-10 and get probabilities back::

    import klayer
    model = klayer.load_model("runs/best")
    probs = model.predict_proba(pixels)     # (n, 10), rows sum to 1
    labels = model.predict(pixels)          # (n,) class indices
    names = [model.class_names[c] for c in labels]

Pixels: uint8, or floats in [0, 255], in either of two layouts —
  (n, 3072)        CIFAR-10's own rows: the 32×32 red plane, then green, then blue;
  (n, 32, 32, 3)   height × width × channel, as Pillow and most image libraries give.
The second is transposed to the first (:func:`to_planes`). The network runs in eval mode
(batch-norm moving averages, no dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klayer.data import Standardizer
from klayer.nn.layers import softmax
from klayer.nn.network import Network
from klayer.nn.errors import UserError

SIZE = 32
CHANNELS = 3
PIXELS = SIZE * SIZE * CHANNELS  # 3072


def to_planes(images) -> np.ndarray:
    """(n, 32, 32, 3) height × width × channel images -> (n, 3072) CIFAR-10 rows
    (red plane, green plane, blue plane, each row-major). (n, 3072) is returned as is."""
    images = np.asarray(images)
    if images.ndim == 2:
        return images
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, CHANNELS):
        raise UserError(f"pixels must have shape (n, {PIXELS}) or (n, {SIZE}, {SIZE}, "
                        f"{CHANNELS}), got {images.shape}")
    return images.transpose(0, 3, 1, 2).reshape(len(images), PIXELS)


@dataclass
class LoadedModel:
    """A network with the standardisation and class names it was trained with.

    network: the :class:`~klayer.nn.network.Network`; standardizer: the
    :class:`~klayer.data.Standardizer` of its training images; class_names: one name
    per output.
    """

    network: Network
    standardizer: Standardizer
    class_names: list

    @classmethod
    def from_run(cls, run) -> "LoadedModel":
        """The model of a run folder (or of its model.npz / model.json), ready for pixels.

        Raises FileNotFoundError for a missing file and ValueError for a damaged one or for a
        model saved without standardisation statistics (not trained by ``klayer train``).
        """
        from klayer import data as D
        from klayer.modelfile import read_model

        net, standardizer, class_names = read_model(run)
        try:
            check_applicable(net, standardizer)
        except UserError as exc:
            raise UserError(f"{run}: {exc}") from None
        if class_names is None:
            class_names = (list(D.CLASS_NAMES) if net.num_classes == len(D.CLASS_NAMES)
                           else [str(c) for c in range(net.num_classes)])
        return cls(net, standardizer, list(class_names))

    def predict_proba(self, pixels, chunk: int = 10000) -> np.ndarray:
        """Class probabilities (n, C) for raw ``pixels`` (see the module docstring)."""
        return softmax(self.network.scores(self.standardized(pixels), "eval", chunk))

    def predict(self, pixels, chunk: int = 10000) -> np.ndarray:
        """Predicted class indices (n,) for raw ``pixels``."""
        return self.network.predict(self.standardized(pixels), chunk)

    def standardized(self, pixels) -> np.ndarray:
        """(n, d) network inputs from raw pixels: layout, range check, standardisation."""
        X = to_planes(pixels)
        d = self.network.input_size
        if X.ndim != 2 or X.shape[1] != d:
            raise UserError(f"pixels must have shape (n, {d}) for this model, got {X.shape}")
        if X.dtype != np.uint8:
            if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
                raise UserError(f"pixels must be uint8 or real numbers, got dtype {X.dtype}")
            if X.size and not (np.isfinite(X).all() and X.min() >= 0 and X.max() <= 255):
                raise UserError("pixels must be raw values in [0, 255] (not standardised or "
                                f"scaled), got range [{X.min()}, {X.max()}]")
        return self.standardizer.transform(X, self.network.dtype)


def check_applicable(net: Network, standardizer) -> None:
    """Raise ValueError unless ``net`` with ``standardizer`` can classify raw pixels (what
    :class:`LoadedModel` and the exports of :mod:`klayer.export` need)."""
    if standardizer is None:
        raise UserError("the model has no standardisation statistics (it was not trained "
                        "on CIFAR-10 by `klayer train`), so it cannot take raw pixels")
    if standardizer.mean.shape != (net.input_size,):
        raise UserError(f"the standardizer has {standardizer.mean.size} dimensions but the "
                        f"network takes {net.input_size}")
    if net.batch_norm and not net.running_initialised:
        raise UserError("the network has batch norm but no moving averages yet (saved "
                        "before its first training step): train it first")
