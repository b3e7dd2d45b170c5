"""Optimizers update the named parameters in place and keep their state serialisable."""

import numpy as np
import pytest

from klayer.nn.optim import OPTIMIZERS, SGD, make_optimizer, per_member


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


@pytest.mark.parametrize("changes", [
    ((np.float32, (4, 3)), (np.float64, (4, 3))),  # the dtype changes, not the shape
    ((np.float64, (4, 3)), (np.float64, (5, 2))),  # the shape changes, not the dtype
], ids=["dtype", "shape"])
def test_sgd_scratch_follows_the_gradients_dtype_and_shape(changes):
    """One SGD used for a parameter whose dtype or shape changes between steps: each step
    is θ - η g bit for bit in θ's own dtype (a float32 scratch would round a float64
    step; a scratch of the old shape does not fit)."""
    opt = SGD()
    for dtype, shape in changes:
        rng = np.random.default_rng(3)
        theta = rng.standard_normal(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        expected = theta - np.asarray(0.1, dtype) * g
        opt.step({"W1": theta}, {"W1": g}, 0.1)
        assert theta.dtype == dtype
        np.testing.assert_array_equal(theta, expected)


@pytest.mark.parametrize("name, state, message", [
    ("sgd", {"velocity/W1": np.zeros(3)},
     r"^SGD keeps no state, but the checkpoint has optimizer entries \['velocity/W1'\]: "
     r"it was written with another optimizer$"),
    ("momentum", {"velocity/W1": np.zeros(3), "m/W1": np.zeros(3)},
     r"^unexpected optimizer entry 'm/W1' for momentum: the checkpoint was written with "
     r"another optimizer$"),
    ("momentum", {"velocity": np.zeros(3)}, r"^unexpected optimizer entry 'velocity' for"),
    ("adam", {"velocity/W1": np.zeros(3)},
     r"^the checkpoint's optimizer state has no Adam step count 't': it was written with "
     r"another optimizer$"),
    ("adam", {"t": 3, "m/W1": np.zeros(3), "velocity/W1": np.zeros(3)},
     r"^unexpected optimizer entry 'velocity/W1' for Adam$"),
    ("adam", {"t": 3, "m": np.zeros(3)}, r"^unexpected optimizer entry 'm' for Adam$"),
])
def test_state_of_another_optimizer_is_refused_by_name(name, state, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(name).load_state_dict(state)


def test_state_dict_round_trip():
    opt = make_optimizer("sgd")
    assert isinstance(opt, SGD) and opt.state_dict() == {}
    opt.load_state_dict({})
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict({"velocity.W1": np.zeros(3)})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("adamw")


def _torch_reference(torch, optimizer_factory, params, grads_per_step, lrs):
    """The same updates through a torch optimizer, for comparison."""
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = optimizer_factory(list(tp.values()))
    for grads, lr in zip(grads_per_step, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, t in tp.items():
            t.grad = torch.tensor(grads[k])
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_stateful_optimizers_match_torch(name, require_torch):
    torch = require_torch
    rng = np.random.default_rng(0)
    params = {"W1": rng.standard_normal((4, 3)), "b1": rng.standard_normal(4)}
    steps = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(5)]
    lrs = [0.1, 0.05, 0.2, 0.1, 0.01]
    factory = {"momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
               "adam": lambda p: torch.optim.Adam(p, lr=0.1)}[name]
    expected = _torch_reference(torch, factory, params, steps, lrs)
    ours = {k: v.copy() for k, v in params.items()}
    opt = make_optimizer(name)
    for grads, lr in zip(steps, lrs):
        opt.step(ours, grads, lr)
    for k in params:
        np.testing.assert_allclose(ours[k], expected[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_stateful_optimizer_state_round_trip(name):
    rng = np.random.default_rng(1)
    params = {"W1": rng.standard_normal((3, 2))}
    a, b = make_optimizer(name), make_optimizer(name)
    g = {"W1": rng.standard_normal((3, 2))}
    a.step(params, g, 0.1)
    b.load_state_dict(a.state_dict())
    pa, pb = {"W1": params["W1"].copy()}, {"W1": params["W1"].copy()}
    a.step(pa, g, 0.1)
    b.step(pb, g, 0.1)
    np.testing.assert_array_equal(pa["W1"], pb["W1"])
    with pytest.raises(ValueError, match="another optimizer"):
        make_optimizer("sgd").load_state_dict(a.state_dict())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_per_member_rates_and_constants_equal_one_optimizer_per_member(name, dtype):
    # A population of K = 3: parameters (K, ...), η and the constants (K,) vectors.
    rng = np.random.default_rng(2)
    params = {"W1": rng.standard_normal((3, 4, 2)).astype(dtype),
              "b1": rng.standard_normal((3, 4)).astype(dtype)}
    steps = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
             for _ in range(4)]
    lrs = np.array([[0.1, 0.01, 0.3], [0.05, 0.02, 0.1], [0.2, 0.0, 0.1], [0.1, 0.1, 0.1]])
    constants = {"sgd": [{}, {}, {}],
                 "momentum": [{"momentum": 0.9}, {"momentum": 0.0}, {"momentum": 0.5}],
                 "adam": [{"beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
                          {"beta1": 0.5, "beta2": 0.9, "eps": 1e-3},
                          {"beta1": 0.0, "beta2": 0.99, "eps": 1e-6}]}[name]
    stacked = {key: np.array([c[key] for c in constants]) for key in constants[0]}
    together = {k: v.copy() for k, v in params.items()}
    opt = OPTIMIZERS[name](**stacked)
    assert opt.hyperparameters().keys() == stacked.keys()
    for grads, lr in zip(steps, lrs):
        opt.step(together, grads, lr)
    for k in range(3):
        alone = {name_: v[k].copy() for name_, v in params.items()}
        member = OPTIMIZERS[name](**constants[k])
        for grads, lr in zip(steps, lrs):
            member.step(alone, {n_: g[k] for n_, g in grads.items()}, float(lr[k]))
        for key in alone:
            assert together[key].dtype == dtype
            if name == "adam":  # β^t: NumPy's power of a vector, Python's of a number
                np.testing.assert_allclose(together[key][k], alone[key], rtol=1e-14)
            else:
                np.testing.assert_array_equal(together[key][k], alone[key])


def test_per_member_lines_a_vector_up_with_the_leading_axis():
    theta = np.zeros((3, 4, 2), np.float32)
    assert per_member(0.5, theta) == 0.5
    lined_up = per_member(np.array([1.0, 2.0, 3.0]), theta)
    assert lined_up.shape == (3, 1, 1) and lined_up.dtype == np.float32
    with pytest.raises(ValueError, match="momentum must be in"):
        OPTIMIZERS["momentum"](np.array([0.9, 1.0]))


# --- the L2 term inside the update (step(..., l2=(2λ, names))) ------------------------


def _blocked_params(dtype, members=None):
    """A weight of more than BLOCK entries (updated in several blocks, the last one
    shorter), a small weight and a bias; (K, ...) stacks for ``members`` K."""
    from klayer.nn.optim import BLOCK
    rng = np.random.default_rng(5)
    lead = () if members is None else (members,)
    rows = BLOCK // (300 if members is None else 300 * members) + 7
    params = {"W1": rng.standard_normal(lead + (rows, 300)).astype(dtype),
              "b1": rng.standard_normal(lead + (rows,)).astype(dtype),
              "W2": rng.standard_normal(lead + (5, rows)).astype(dtype)}
    steps = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
             for _ in range(3)]
    return params, steps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_l2_inside_the_update_equals_adding_it_to_the_gradient_first(name, dtype):
    """step(..., l2=(2λ, names)) gives bit for bit what adding 2λ θ to the gradients
    (as Network.add_l2_gradient does: θ·2λ, then g + that) and stepping gives, and
    leaves the gradients untouched."""
    from klayer.nn.optim import BLOCK
    params, steps = _blocked_params(dtype)
    assert params["W1"].size > BLOCK and params["W1"].shape[0] * 300 % BLOCK
    twice_lam, names = 2 * 5e-3, ("W1", "W2")
    fused = {k: v.copy() for k, v in params.items()}
    plain = {k: v.copy() for k, v in params.items()}
    a, b = make_optimizer(name), make_optimizer(name)
    for lr, grads in zip([0.1, 0.05, 0.2], steps):
        before = {k: g.copy() for k, g in grads.items()}
        a.step(fused, grads, lr, l2=(twice_lam, names))
        for k in grads:
            np.testing.assert_array_equal(grads[k], before[k])
        with_l2 = {k: g + plain[k] * twice_lam if k in names else g for k, g in grads.items()}
        b.step(plain, with_l2, lr)
        for k in params:
            assert fused[k].dtype == dtype
            np.testing.assert_array_equal(fused[k], plain[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_with_l2_is_the_plain_formula(dtype):
    """θ ← θ - η (g + 2λ θ), evaluated as written, bit for bit (float32 and float64)."""
    params, steps = _blocked_params(dtype)
    theta, g = params["W1"].copy(), steps[0]["W1"]
    SGD().step(params, steps[0], 0.1, l2=(0.01, ("W1", "W2")))
    np.testing.assert_array_equal(params["W1"], theta - (g + theta * 0.01) * 0.1)


def test_momentum_with_l2_is_the_plain_formula():
    """v ← μ v + g + 2λ θ, θ ← θ - η v over three steps, float64 to 1e-12."""
    params, steps = _blocked_params(np.float64)
    theta = params["W1"].copy()
    v = None
    opt = make_optimizer("momentum")
    for lr, grads in zip([0.1, 0.05, 0.2], steps):
        g = grads["W1"] + 0.01 * theta
        v = g if v is None else 0.9 * v + g
        theta = theta - lr * v
        opt.step(params, grads, lr, l2=(0.01, ("W1", "W2")))
    np.testing.assert_allclose(params["W1"], theta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_l2_inside_a_population_update_equals_one_member_at_a_time(name):
    """Per-member η, μ and 2λ (K, 1, 1) on parameters of more than BLOCK entries,
    including a bias (K, m) whose blocks cut the member axis: each member's numbers are
    those of the member trained alone, bit for bit."""
    from klayer.nn.optim import BLOCK
    K = 3
    params, steps = _blocked_params(np.float32, members=K)
    params["b2"] = np.random.default_rng(6).standard_normal((K, BLOCK // 2)).astype(np.float32)
    for grads in steps:
        grads["b2"] = np.ones_like(params["b2"])
    lam = np.array([1e-3, 0.0, 5e-2])
    twice = (2 * lam).astype(np.float32)[:, None, None]
    lrs = np.array([0.1, 0.01, 0.3])
    constants = {"sgd": {}, "momentum": {"momentum": np.array([0.9, 0.0, 0.5])}}[name]
    together = {k: v.copy() for k, v in params.items()}
    opt = OPTIMIZERS[name](**constants)
    for grads in steps:
        opt.step(together, grads, lrs, l2=(twice, ("W1", "W2")))
    for k in range(K):
        alone = {key: v[k].copy() for key, v in params.items()}
        member = OPTIMIZERS[name](**{c: float(v[k]) for c, v in constants.items()})
        for grads in steps:
            member.step(alone, {key: g[k] for key, g in grads.items()}, float(lrs[k]),
                        l2=(twice[k, 0, 0], ("W1", "W2")))
        for key in alone:
            np.testing.assert_array_equal(together[key][k], alone[key])


def test_network_l2_term_with_the_update_equals_the_l2_gradient():
    """loss(l2_gradient=False) + step(l2=net.l2_term(λ)) moves a network exactly as
    loss() + step() does, and l2_term(0) is None."""
    from klayer.nn.network import Network
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((20, 12)).astype(np.float32), rng.integers(0, 3, 20)
    nets = [Network(12, [8, 6], 3, dtype="float32", seed=1) for _ in range(2)]
    opts = [make_optimizer("momentum") for _ in range(2)]
    assert nets[0].l2_term(0.0) is None
    for _ in range(3):
        a = nets[0].loss(X, y, 0.01, l2_gradient=False)
        opts[0].step(nets[0].params, a.grads, 0.1, l2=nets[0].l2_term(0.01))
        b = nets[1].loss(X, y, 0.01)
        assert a.cost == b.cost
        opts[1].step(nets[1].params, b.grads, 0.1)
    for k in nets[0].params:
        np.testing.assert_array_equal(nets[0].params[k], nets[1].params[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("members", [None, 3])
def test_a_weight_average_riding_the_update_equals_averaging_after_it(name, dtype, members):
    """step(..., average=ema.riding()) leaves the parameters, the optimizer and the EMA's
    averages bit for bit where step() then ema.update() leaves them, over several steps
    of blocked parameters (one network and a population), with the L2 term riding too;
    the EMA's step count moves the same."""
    from klayer.levers.ema import EMA
    params, steps = _blocked_params(dtype, members)
    riding_params = {k: v.copy() for k, v in params.items()}
    plain_params = {k: v.copy() for k, v in params.items()}
    a, b = make_optimizer(name), make_optimizer(name)
    ema_a, ema_b = EMA(0.99), EMA(0.99)
    l2 = (2 * 5e-3, ("W1", "W2"))
    for lr, grads in zip([0.1, 0.05, 0.2, 0.1], [*steps, steps[0]]):
        riding = ema_a.riding()
        a.step(riding_params, grads, lr, l2=l2, average=riding)
        if riding is None:
            ema_a.update(riding_params)
        b.step(plain_params, grads, lr, l2=l2)
        ema_b.update(plain_params)
        assert ema_a.step == ema_b.step
        for k in params:
            np.testing.assert_array_equal(riding_params[k], plain_params[k])
            np.testing.assert_array_equal(ema_a.params[k], ema_b.params[k])
            assert ema_a.params[k].dtype == dtype
    assert not np.array_equal(ema_a.params["W1"], riding_params["W1"])  # it averaged


def test_the_average_step_is_the_plain_formula():
    """a ← a + w (θ - a), evaluated as written, bit for bit, over two momentum steps:
    the average lags the weights by what the formula says."""
    params, steps = _blocked_params(np.float32)
    averages = {k: v.copy() for k, v in params.items()}
    opt = make_optimizer("momentum")
    for grads in steps[:2]:
        before = averages["W1"].copy()
        opt.step(params, grads, 0.1, average=(averages, 0.25))
        np.testing.assert_array_equal(averages["W1"],
                                      before + (params["W1"] - before) * np.float32(0.25))
