"""Batch-norm population statistics recomputed with the weights frozen.

During training the statistics used at evaluation are exponential moving averages of
batch statistics (α = 0.9): they weight the last ~10 batches most, and those batches
were normalised by weights that kept changing. Two alternatives:

- **PreciseBN** (Wu & Johnson, 2021): after training, run many training batches through
  the frozen network in train mode and average their batch means and (biased) variances,
  layer by layer. The statistics then belong to the final weights.
- **Adaptive BN** (Li et al., 2016): the same recomputation over the *test* inputs. This
  uses the test images (never their labels) to set the statistics: it is transductive,
  and results obtained with it are labelled as such everywhere klayer reports them.

Both return new buffers and leave the network untouched; :func:`use_statistics` swaps
them in. Dropout is off (no masks) and, unless ``augment`` is given, the images are
used as they are.
"""

from __future__ import annotations

import numpy as np

from klayer.nn.errors import UserError
from klayer.nn.network import Network


def population_statistics(net: Network, X, batch_size: int = 100,
                          num_batches: int | None = None, seed: int = 0,
                          augment=None) -> dict:
    """Average batch statistics of ``num_batches`` batches of ``batch_size`` rows of X.

    The batches are disjoint, drawn in a random order from a generator seeded with
    ``seed``; ``num_batches`` None (or more than X holds) uses every whole batch of X.
    augment: an :class:`klayer.levers.augment.Augmentation` applied to each batch, or None.
    Returns ``{"running_mean{l}": μ_l, "running_var{l}": v_l}`` in the network's dtype.
    """
    if not net.batch_norm:
        raise UserError("population statistics belong to batch norm; this network has none")
    X = np.asarray(X)
    if batch_size < 2:
        raise UserError(f"batch_size must be at least 2 for batch statistics, got {batch_size}")
    available = len(X) // batch_size
    if available == 0:
        raise UserError(f"X has {len(X)} rows, fewer than one batch of {batch_size}")
    if num_batches is not None and num_batches < 1:
        raise UserError(f"num_batches must be at least 1, got {num_batches}")
    count = available if num_batches is None else min(num_batches, available)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))[:count * batch_size]
    sums: dict[int, list] = {}
    for i in range(count):
        Xb = X[order[i * batch_size:(i + 1) * batch_size]]
        if augment is not None:
            Xb = augment(Xb, rng)
        stats = net.forward(Xb, "train").batch_stats
        for l, (mean, var) in stats.items():
            if l in sums:
                sums[l][0] += mean
                sums[l][1] += var
            else:
                sums[l] = [mean.astype(np.float64), var.astype(np.float64)]
    buffers = {}
    for l, (mean, var) in sums.items():
        buffers[f"running_mean{l}"] = (mean / count).astype(net.dtype)
        buffers[f"running_var{l}"] = (var / count).astype(net.dtype)
    return buffers


def use_statistics(net: Network, buffers: dict) -> dict:
    """Put ``buffers`` into ``net``; return the buffers it had (to put them back)."""
    if set(buffers) != set(net.buffers) and net.running_initialised:
        raise UserError(f"statistics for {sorted(buffers)} do not match the network's "
                        f"{sorted(net.buffers)}")
    old = net.buffers
    net.buffers = {k: np.array(v) for k, v in buffers.items()}
    net.running_initialised = True
    return old
