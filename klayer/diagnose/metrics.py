"""How far one set of gradients is from another, tensor by tensor (see
:mod:`klayer.diagnose.check`)."""

from __future__ import annotations

import numpy as np

TOL = 1e-5  # a tensor is right when its scaled error is at most this


def scales(exact: dict) -> dict:
    top = max(float(np.abs(e).max()) for e in exact.values())
    return {name: max(float(np.abs(e).max()), 1e-3 * top, 1e-300) for name, e in exact.items()}


def scaled_errors(grads: dict, exact: dict) -> dict:
    """error_t per tensor: max_i |g_i - e_i| / max(max_i |e_i|, 1e-3 · max_all |e|)."""
    scale = scales(exact)
    return {name: float(np.abs(grads[name] - exact[name]).max()) / scale[name]
            for name in exact}
