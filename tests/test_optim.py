"""Optimizers update the named parameters in place and keep their state serialisable."""

import numpy as np
import pytest

from klayer.optim import SGD, make_optimizer


def _params(dtype):
    rng = np.random.default_rng(0)
    params = {"W1": rng.standard_normal((4, 3)).astype(dtype), "b1": np.zeros(4, dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step_in_place(dtype):
    params, grads = _params(dtype)
    arrays = dict(params)  # the same objects
    expected = {k: params[k] - np.asarray(0.1, dtype) * grads[k] for k in params}
    grads_before = {k: g.copy() for k, g in grads.items()}
    opt = SGD()
    opt.step(params, grads, 0.1)
    for k in params:
        assert params[k] is arrays[k]  # updated in place, not replaced
        assert params[k].dtype == dtype
        np.testing.assert_array_equal(params[k], expected[k])  # bit for bit θ - η g
        np.testing.assert_array_equal(grads[k], grads_before[k])  # gradients untouched


def test_sgd_reuses_its_scratch_buffers():
    params, grads = _params(np.float64)
    opt = SGD()
    opt.step(params, grads, 0.1)
    scratch = {k: id(v) for k, v in opt._scratch.items()}
    opt.step(params, grads, 0.2)
    assert {k: id(v) for k, v in opt._scratch.items()} == scratch


def test_state_dict_round_trip():
    opt = make_optimizer("sgd")
    assert isinstance(opt, SGD) and opt.state_dict() == {}
    opt.load_state_dict({})
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict({"velocity.W1": np.zeros(3)})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("adamw")
