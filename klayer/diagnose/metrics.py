"""How far one set of gradients is from another, tensor by tensor (see
:mod:`klayer.diagnose.check`)."""

from __future__ import annotations

import numpy as np

TOL = 1e-5  # a tensor is right when its scaled error is at most this


def scales(exact: dict) -> dict:
    """Per tensor, the size its errors are measured against: its largest exact entry, or
    the network's largest when the tensor's exact gradient is ~0 (∂J/∂b_l under batch
    norm: its computed value is rounding noise, ~1e-17 in float64, ~1e-8 in float32)."""
    top = max(max(float(np.abs(e).max()) for e in exact.values()), 1e-300)
    out = {}
    for name, e in exact.items():
        size = float(np.abs(e).max())
        out[name] = size if size > 1e-6 * top else top
    return out


def scaled_errors(grads: dict, exact: dict) -> dict:
    """error_t per tensor: max_i |g_i - e_i| / scale_t (:func:`scales`)."""
    scale = scales(exact)
    return {name: float(np.abs(grads[name] - exact[name]).max()) / scale[name]
            for name in exact}
