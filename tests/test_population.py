"""Population training: K networks in lockstep equal K networks trained alone."""

from types import SimpleNamespace

import numpy as np
import pytest

from klayer import runs
from klayer import modelfile
from klayer.levers import augment
from klayer.nn import layers
from klayer.config import TrainConfig
from klayer.nn.gradcheck import absolute_error, numerical_gradients, relative_error
from klayer.nn.network import Network
from klayer.nn.optim import SGD, Adam, Momentum
from klayer.config import check_population
from klayer.nn.population import Population, select_optimizer
from klayer.nn.schedules import CyclicLR, PerMember
from klayer.train import Dropped, TrainResult, train, train_population, write_run

from conftest import Stop, stop_at

D, HIDDEN, C = 12, [8, 8], 4


def _batches(steps, n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, D)), rng.integers(0, C, n)) for _ in range(steps)]


# Three members differing in initialisation (seed and σ), λ, η_max, dropout p and label
# smoothing ε; the optimizers differ in their constants too.
MEMBERS = [dict(seed=0, init="he", dropout=0.0, label_smoothing=0.0),
           dict(seed=1, init=0.3, dropout=0.2, label_smoothing=0.1),
           dict(seed=2, init="xavier", dropout=0.4, label_smoothing=0.0)]
LAMS = np.array([0.0, 0.01, 0.1])
SCHEDULES = [CyclicLR(1e-4, 0.1, 20), CyclicLR(1e-3, 0.05, 20), CyclicLR(1e-5, 0.2, 20)]
OPTIMIZERS = {  # name: (population optimizer, member k's own)
    "sgd": (lambda: SGD(), lambda k: SGD()),
    "momentum": (lambda: Momentum(np.array([0.9, 0.5, 0.8])),
                 lambda k: Momentum([0.9, 0.5, 0.8][k])),
    "adam": (lambda: Adam(np.array([0.9, 0.8, 0.85]), np.array([0.999, 0.99, 0.995]),
                          np.array([1e-8, 1e-6, 1e-7])),
             lambda k: Adam([0.9, 0.8, 0.85][k], [0.999, 0.99, 0.995][k],
                            [1e-8, 1e-6, 1e-7][k])),
}
OPTIONS = {"batch norm": dict(batch_norm=True),
           "layer norm, residual": dict(batch_norm=False, layer_norm=True, residual=True),
           "BN after ReLU": dict(batch_norm=True, norm_position="after")}


def _train_alone(k, options, optimizer, batches):
    net = Network(D, HIDDEN, C, **options, **MEMBERS[k])
    rng = np.random.default_rng([MEMBERS[k]["seed"], 3])
    for step, (X, y) in enumerate(batches):
        masks = net.dropout_masks(len(X), rng) or None
        res = net.loss(X, y, LAMS[k], masks=masks)
        optimizer.step(net.params, res.grads, SCHEDULES[k](step))
        net.update_running_stats(res.batch_stats)
    return net


def _train_together(options, optimizer, batches, members=(0, 1, 2)):
    pop = Population(Network(D, HIDDEN, C, **options, **MEMBERS[k]) for k in members)
    rngs = [np.random.default_rng([MEMBERS[k]["seed"], 3]) for k in members]
    schedule = PerMember(tuple(SCHEDULES[k] for k in members))
    for step, (X, y) in enumerate(batches):
        masks = pop.dropout_masks(len(X), rngs) or None
        res = pop.loss(X, y, LAMS[list(members)], masks=masks)
        optimizer.step(pop.params, res.grads, schedule(step))
        pop.update_running_stats(res.batch_stats)
    return pop


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_member_follows_its_own_trajectory(name, options):
    batches = _batches(100)
    make_population_optimizer, make_member_optimizer = OPTIMIZERS[name]
    pop = _train_together(options, make_population_optimizer(), batches)
    for k, member in enumerate(pop.members()):
        alone = _train_alone(k, options, make_member_optimizer(k), batches)
        assert member.hyperparameters() == alone.hyperparameters()
        for arrays, expected in ((member.params, alone.params),
                                 (member.buffers, alone.buffers)):
            assert arrays.keys() == expected.keys()
            for key in arrays:
                np.testing.assert_allclose(arrays[key], expected[key], rtol=0, atol=1e-10,
                                           err_msg=f"member {k}, {key}")
        # A bias feeding batch norm has gradient exactly 0, so no optimizer (Adam
        # included) moves it from its initial 0, alone or in the population.
        for l in range(1, member.num_layers):
            if member.bias_cancelled(l):
                assert not member.params[f"b{l}"].any() and not alone.params[f"b{l}"].any()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_members_from_one_initialisation_go_their_own_ways(name):
    """Three members with the same seed and initialisation, differing only in λ, the
    schedule and the optimizer's constants: equal at the start, apart at the end, and
    each where it goes alone. A population that gave every member one member's λ, η or
    constants would leave them equal."""
    same = dict(seed=0, init="he", dropout=0.0, label_smoothing=0.0)
    pop = Population(Network(D, HIDDEN, C, batch_norm=True, **same) for _ in range(3))
    for key, value in pop.params.items():
        assert all(np.array_equal(value[0], value[k]) for k in (1, 2)), key
    batches = _batches(60)
    optimizer = OPTIMIZERS[name][0]()
    schedule = PerMember(tuple(SCHEDULES))
    for step, (X, y) in enumerate(batches):
        res = pop.loss(X, y, LAMS)
        optimizer.step(pop.params, res.grads, schedule(step))
        pop.update_running_stats(res.batch_stats)
    for key in ("W1", "W2", "W3"):
        W = pop.params[key]
        for a, b in ((0, 1), (1, 2), (0, 2)):
            assert np.abs(W[a] - W[b]).max() > 1e-3, (key, a, b)
    for k, member in enumerate(pop.members()):
        alone = Network(D, HIDDEN, C, batch_norm=True, **same)
        own = OPTIMIZERS[name][1](k)
        for step, (X, y) in enumerate(batches):
            res = alone.loss(X, y, LAMS[k])
            own.step(alone.params, res.grads, SCHEDULES[k](step))
            alone.update_running_stats(res.batch_stats)
        for key in alone.params:
            np.testing.assert_allclose(member.params[key], alone.params[key], rtol=0,
                                       atol=1e-10, err_msg=f"member {k}, {key}")


@pytest.mark.parametrize("options", [
    dict(batch_norm=True), dict(batch_norm=False),
    dict(batch_norm=False, layer_norm=True, residual=True),
    dict(batch_norm=True, norm_position="after", residual=True),
], ids=["BN", "plain", "LN residual", "BN after residual"])
def test_gradients_of_every_member_match_centred_differences(options):
    hidden = [6, 6]
    pop = Population.build(3, 5, hidden, 3, seed=[0, 1, 2], init=["he", 0.5, "xavier"],
                           dropout=[0.0, 0.3, 0.5], label_smoothing=[0.0, 0.2, 0.1],
                           dtype="float64", **options)
    rng = np.random.default_rng(7)
    for name in pop.params:  # non-trivial γ, β and biases
        if not name.startswith("W"):
            pop.params[name] += 0.3 * rng.standard_normal(pop.params[name].shape)
    X, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    masks = pop.dropout_masks(8, [np.random.default_rng(s) for s in range(3)])
    lam = np.array([0.0, 0.05, 0.2])
    analytic = pop.loss(X, y, lam, masks=masks).grads

    # The members are independent, so d(Σ_k J_k)/dθ_k = dJ_k/dθ_k.
    def cost():
        return float(pop.loss(X, y, lam, grads=False, masks=masks).cost.sum())

    numeric = numerical_gradients(cost, pop.params)
    for name in pop.params:
        layer = int(name.lstrip("Wbgametb"))
        for k in range(3):
            if name.startswith("b") and pop.bias_cancelled(layer):
                assert absolute_error(analytic[name][k], numeric[name][k]) < 1e-8, (name, k)
            else:
                assert relative_error(analytic[name][k], numeric[name][k]) < 1e-7, (name, k)


def test_population_scores_in_chunks_agree_with_one_pass():
    pop = Population.build(3, D, HIDDEN, C, seed=[0, 1, 2], batch_norm=False)
    X = np.random.default_rng(4).standard_normal((10, D))
    whole = pop.scores(X, chunk=100)
    assert whole.shape == (3, 10, C)
    np.testing.assert_allclose(pop.scores(X, chunk=3), whole, rtol=1e-12)


def test_members_round_trip_and_select():
    nets = [Network(D, HIDDEN, C, **m) for m in MEMBERS]
    pop = Population(nets)
    assert pop.size == 3 and pop.params["W1"].shape == (3, 8, D)
    assert pop.params["b2"].shape == (3, 8)
    np.testing.assert_array_equal(pop.dropout, [0.0, 0.2, 0.4])
    for net, member in zip(nets, pop.members()):
        assert member.hyperparameters() == net.hyperparameters()
        for key in net.params:
            np.testing.assert_array_equal(member.params[key], net.params[key])
    two = pop.select([2, 0])
    assert [hp["seed"] for hp in two.hyperparameters()] == [2, 0]
    np.testing.assert_array_equal(two.params["W3"][0], nets[2].params["W3"])
    with pytest.raises(ValueError, match="must share hidden_sizes"):
        Population([Network(D, [8, 8], C), Network(D, [8, 7], C)])
    with pytest.raises(ValueError, match="must share batch_norm"):
        Population([Network(D, [8], C), Network(D, [8], C, batch_norm=False)])


def test_population_evaluation_is_each_members_evaluation():
    pop = _train_together(dict(batch_norm=True), SGD(), _batches(5))
    X, y = _batches(1, n=40, seed=9)[0]
    together = pop.evaluate(X, y, LAMS)
    assert pop.scores(X).shape == (3, 40, C)
    for k, net in enumerate(pop.members()):
        alone = net.evaluate(X, y, LAMS[k])
        for key in alone:
            assert together[key][k] == pytest.approx(alone[key], rel=1e-12, abs=1e-15)


def test_select_optimizer_slices_constants_and_state():
    opt = Adam(np.array([0.9, 0.8, 0.7]), 0.999, np.array([1e-8, 1e-7, 1e-6]))
    params = {"W": np.ones((3, 2, 2))}
    opt.step(params, {"W": np.arange(12.0).reshape(3, 2, 2)}, np.array([0.1, 0.2, 0.3]))
    kept = select_optimizer(opt, np.array([0, 2]))
    assert kept.t == 1 and kept.beta2 == 0.999
    np.testing.assert_array_equal(kept.beta1, [0.9, 0.7])
    np.testing.assert_array_equal(kept.m["W"], opt.m["W"][[0, 2]])
    np.testing.assert_array_equal(kept.v["W"], opt.v["W"][[0, 2]])
    momentum = select_optimizer(Momentum(np.array([0.9, 0.5])), [1])
    np.testing.assert_array_equal(momentum.momentum, [0.5])


# --- train_population ---------------------------------------------------------------

BASE = TrainConfig(dtype="float64", hidden_sizes=(16, 16), n_s=25, cycles=2,
                   batch_size=20, evals_per_cycle=4)


def _same(result, expected):
    """A population member's TrainResult equals the solo run's (1e-10)."""
    assert [set(row) for row in result.history] == [set(row) for row in expected.history]
    for got, want in zip(result.history, expected.history):
        assert got["step"] == want["step"]
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    for key in expected.final:
        assert result.final[key] == pytest.approx(expected.final[key], rel=1e-10, abs=1e-12)
    for arrays, want in ((result.network.params, expected.network.params),
                         (result.network.buffers, expected.network.buffers)):
        for key in want:
            np.testing.assert_allclose(arrays[key], want[key], rtol=0, atol=1e-10)
    assert result.best_step == expected.best_step and result.steps == expected.steps


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_population_equals_one_run_per_config(data, optimizer):
    # Same seed: same shuffles as the solo runs, so each member is exactly its run.
    base = BASE.replace(optimizer=optimizer, eta_max=0.1 if optimizer == "sgd" else 0.01)
    configs = [base.replace(dropout=0.1),
               base.replace(lam=0.05, eta_max=base.eta_max / 2, dropout=0.3, init=0.2),
               base.replace(lam=0.0, schedule="cosine", warmup_steps=5, evals_per_cycle=5,
                            label_smoothing=0.1)]
    results = train_population(configs, data)
    assert all(isinstance(r, TrainResult) for r in results)
    for config, result in zip(configs, results):
        assert result.config == config
        _same(result, train(config, data))
    assert len(results[2].history) != len(results[0].history)  # its own eval steps


def test_members_share_the_data_seed_and_keep_their_own_seeds(data):
    plain = BASE.replace(batch_norm=False, dropout=0.2, data_seed=7)
    configs = [plain, plain.replace(seed=1)]
    together = train_population(configs, data)
    for config, member in zip(configs, together):  # data from seed 7, masks from its seed
        _same(member, train(config, data))
    assert together[0].history[-1]["train_cost"] != \
        pytest.approx(together[1].history[-1]["train_cost"])
    with pytest.raises(ValueError, match="share data_seed"):  # None: the seed orders the data
        train_population([c.replace(data_seed=None) for c in configs], data)


def test_diverging_member_is_dropped_and_the_others_go_on(data):
    base = BASE.replace(batch_norm=False, schedule="constant", eta_max=0.05)
    configs = [base, base.replace(eta_max=1e8), base.replace(lam=0.02)]
    results = train_population(configs, data)
    dropped = results[1]
    assert isinstance(dropped, Dropped)
    assert "not finite" in dropped.reason and f"step {dropped.step}" in dropped.reason
    assert 0 < dropped.step < base.total_steps and dropped.eta == 1e8
    assert dropped.history and dropped.history[0]["step"] == 0
    without = train_population([configs[0], configs[2]], data)
    _same(results[0], without[0])
    _same(results[2], without[1])


def test_all_members_diverging_leaves_only_dropped(data):
    base = BASE.replace(batch_norm=False, schedule="constant", eta_max=1e8)
    results = train_population([base, base.replace(eta_max=1e9)], data)
    assert all(isinstance(r, Dropped) for r in results)


@pytest.mark.parametrize("change,option", [
    (dict(hidden_sizes=(16, 8)), "hidden_sizes"), (dict(batch_size=10), "batch_size"),
    (dict(n_s=50), "total_steps"), (dict(dtype="float32"), "dtype"),
    (dict(flip=True), "flip"), (dict(optimizer="adam"), "optimizer"),
    (dict(subset=100), "subset"),
])
def test_configs_must_share_the_architecture_and_the_stream(change, option):
    with pytest.raises(ValueError, match=f"^population configs must share {option}: "):
        check_population([BASE, BASE.replace(lam=0.1), BASE.replace(**change)])
    check_population([BASE, BASE.replace(n_s=50, cycles=1, lam=0.1, seed=3, eta_max=0.2,
                                         data_seed=0)])


def test_write_run_leaves_a_normal_run_folder(data, tmp_path):
    plain = BASE.replace(batch_norm=False, schedule="constant", eta_max=0.05)
    configs = [plain, plain.replace(eta_max=1e8)]
    results = train_population(configs, data)
    write_run(tmp_path / "a", results[0], data)
    net, _standardizer, _classes = modelfile.read_model(tmp_path / "a")
    np.testing.assert_array_equal(net.params["W1"], results[0].network.params["W1"])
    assert runs.read_config(tmp_path / "a").replace(out=None) == configs[0]
    assert len(runs.read_history(tmp_path / "a" / runs.HISTORY_FILE)) == len(results[0].history)
    assert runs.read_summary(tmp_path / "a")["final"] == results[0].final
    write_run(tmp_path / "b", results[1], data)  # dropped: config, history and the reason
    assert runs.read_summary(tmp_path / "b")["diverged"] == results[1].reason
    assert not (tmp_path / "b" / runs.MODEL_FILE).exists()


def test_members_finish_as_runs_alone_do_with_flip_averaging(tmp_path):
    """On CIFAR-10-shaped rows, a member's summary has a solo run's keys, test-time flip
    averaging included, and its test_accuracy_tta is the flip-averaged accuracy."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((100, 3072))
    left = X.reshape(-1, 3, 32, 32)[:, 0, :, :16].mean(axis=(1, 2))
    y = (left > 0).astype(np.int64) + 2 * (X[:, 0] > 0)  # not mirror-symmetric
    data = SimpleNamespace(X_train=X[:60], y_train=y[:60], X_val=X[60:80], y_val=y[60:80],
                           X_test=X[80:], y_test=y[80:])
    config = TrainConfig(hidden_sizes=(8,), n_s=3, cycles=1, batch_size=20, eta_max=0.1,
                         evals_per_cycle=2, flip=True, precise_bn=2)
    train(config, data, run_dir=tmp_path / "alone")
    member = train_population([config, config.replace(lam=0.01)], data)[0]
    write_run(tmp_path / "member", member, data)
    alone, together = (runs.read_summary(tmp_path / name) for name in ("alone", "member"))
    assert set(together) == set(alone)
    for key in ("final", "final_moving_average"):
        assert set(together[key]) == set(alone[key]), key
    assert "test_accuracy_tta" in together["final"]
    net = member.network
    X_test = data.X_test.astype(net.dtype)
    p = layers.softmax(net.scores(X_test)) + layers.softmax(net.scores(augment.mirror(X_test)))
    assert together["final"]["test_accuracy_tta"] == np.mean(p.argmax(axis=1) == data.y_test)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_resumed_population_ends_bit_identical_to_an_uninterrupted_one(data, tmp_path,
                                                                       batch_norm):
    # 10 steps an epoch: checkpoints at 10, 20, ...; stopped at 25, resumed from 20.
    base = BASE.replace(batch_norm=batch_norm, dropout=0.2, optimizer="momentum")
    configs = [base, base.replace(lam=0.02, seed=3, eta_max=0.05, data_seed=0)]
    if not batch_norm:  # and a member dropped before the interruption
        configs.append(base.replace(schedule="constant", eta_max=1e8))
    uninterrupted = train_population(configs, data)
    with pytest.raises(Stop):
        train_population(configs, data, callbacks=[stop_at(25)], checkpoint_dir=tmp_path)
    assert runs.load_checkpoint(tmp_path).step == 20
    seen = []
    resumed = train_population(configs, data, checkpoint_dir=tmp_path, resume=True,
                               callbacks=[lambda e: e.kind == "step" and seen.append(e.step)])
    assert seen[0] == 21 and seen[-1] == base.total_steps  # it went on from step 20
    for got, want in zip(resumed, uninterrupted):
        assert type(got) is type(want) and got.history == want.history
        if isinstance(want, Dropped):
            assert (got.step, got.eta, got.reason) == (want.step, want.eta, want.reason)
            continue
        assert got.final == want.final
        for key in want.network.params:
            np.testing.assert_array_equal(got.network.params[key], want.network.params[key])
        for key in want.network.buffers:
            np.testing.assert_array_equal(got.network.buffers[key], want.network.buffers[key])
    if not batch_norm:
        assert isinstance(resumed[2], Dropped) and resumed[2].step < 20
    with pytest.raises(ValueError, match="belongs to other configs"):
        train_population([configs[0].replace(lam=0.3), *configs[1:]], data,
                         checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_population(configs, data, resume=True)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train_population(configs, data, checkpoint_dir=tmp_path)


def test_float32_population_computes_in_float32_and_tracks_the_solo_runs(data):
    base = BASE.replace(dtype="float32")
    configs = [base, base.replace(lam=0.05, eta_max=0.05)]
    for config, result in zip(configs, train_population(configs, data)):
        assert all(a.dtype == np.float32 for a in result.network.params.values())
        alone = train(config, data)
        for key, want in alone.network.params.items():  # rounding differs, not the maths
            np.testing.assert_allclose(result.network.params[key], want, rtol=0, atol=1e-5)
        assert result.final["val_cost"] == pytest.approx(alone.final["val_cost"], rel=1e-5)
