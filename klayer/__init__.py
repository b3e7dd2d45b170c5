"""klayer: k-layer fully-connected networks with batch normalization, in NumPy.

Every gradient is derived by hand and checked against centred differences and PyTorch.

Public entry point for using a trained run from Python: :func:`load_model`.
"""

from klayer.version import __version__


def load_model(run):
    """The trained model of a run folder, ready to classify raw pixels.

    ``run``: a run folder written by ``klayer train`` (or its model.npz / model.json).
    Returns a :class:`klayer.model.LoadedModel` with ``network``, ``standardizer``,
    ``class_names`` and ``predict_proba(pixels)`` -> (n, 10) probabilities,
    ``predict(pixels)`` -> (n,) class indices. ``pixels``: uint8 or floats in [0, 255],
    shape (n, 3072) in CIFAR-10's layout (red, green, blue planes of 32×32) or
    (n, 32, 32, 3) height × width × channel. Evaluation mode: batch-norm moving
    averages, no dropout.
    """
    from klayer.model import LoadedModel  # NumPy only when needed

    return LoadedModel.from_run(run)
