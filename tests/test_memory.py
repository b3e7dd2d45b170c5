"""klayer.memory: what a run needs, known before it is spent; the search grid limit."""

import pytest

from klayer import memory
from klayer.commands.search import grid_size
from klayer.config import TrainConfig
from klayer.nn.network import Network

GIB = 2**30


@pytest.mark.parametrize("options", [
    {}, {"hidden_sizes": ()}, {"batch_norm": False, "dtype": "float32"},
    {"batch_norm": False, "layer_norm": True, "hidden_sizes": (30, 20, 10)},
])
def test_parameter_bytes_match_a_real_network(options):
    config = TrainConfig(**options)
    net = Network(64, config.hidden_sizes, 10, batch_norm=config.batch_norm,
                  layer_norm=config.layer_norm, dtype=config.dtype)
    expected = sum(p.nbytes for p in net.params.values())
    assert memory.estimate(config, input_size=64)["parameters"] == expected


def test_optimizer_state_in_copies_of_the_parameters():
    config = TrainConfig()
    params = memory.estimate(config)["parameters"]
    copies = {name: memory.estimate(config.replace(optimizer=name))["optimizer"] / params
              for name in ("sgd", "momentum", "adam")}
    assert copies == {"sgd": 1, "momentum": 2, "adam": 3}  # state + the update's scratch


def test_data_bytes_follow_protocol_and_subset():
    full = memory.estimate(TrainConfig(dtype="float64"))["data"]
    assert full == 60_000 * 3072 * 8
    assert memory.estimate(TrainConfig(dtype="float32", subset=1000))["data"] == \
        3000 * 3072 * 4
    assert memory.split_sizes(TrainConfig(protocol="single", subset=20_000)) == \
        (10_000, 10_000, 10_000)
    assert memory.estimate(TrainConfig(dtype="float64"), n_train=10, n_val=10, n_test=10)["data"] == \
        30 * 3072 * 8


def test_activations_grow_with_width_and_batch():
    small = memory.estimate(TrainConfig())
    wide = memory.estimate(TrainConfig(hidden_sizes=(500, 500)))
    big_batch = memory.estimate(TrainConfig(batch_size=1000))
    assert wide["batch_activations"] > small["batch_activations"]
    assert wide["eval_activations"] > small["eval_activations"]
    assert big_batch["batch_activations"] > small["batch_activations"]
    assert big_batch["eval_activations"] == small["eval_activations"]


def test_check_fits():
    estimate = memory.estimate(TrainConfig(dtype="float64"))
    memory.check_fits(estimate, "this run", available=100 * GIB)
    with pytest.raises(ValueError) as err:
        memory.check_fits(estimate, "this run", available=GIB // 2)
    message = str(err.value)
    assert message.startswith("this run needs ~1.4") and "0.5 GiB available" in message
    assert "reduce --hidden" in message and "\n" not in message
    huge = memory.estimate(TrainConfig(hidden_sizes=(10**300,)))
    with pytest.raises(ValueError, match="GiB available"):
        memory.check_fits(huge, "this run")


def test_available_bytes_on_this_machine():
    available = memory.available_bytes()
    assert isinstance(available, int) and available > 0


@pytest.mark.parametrize("doc, points", [
    ({}, 1),
    ({"search": {"method": "random", "space": {"lam": {"log_uniform": [1, 2], "grid": 9}}}},
     1),
    ({"search": {"space": {"lam": {"log_uniform": [1e-5, 1e-1], "grid": 8},
                           "batch_norm": {"choice": [True, False]}}}}, 16),
    ({"search": {"method": "coarse-to-fine",
                 "space": {"lam": {"log_uniform": [1e-5, 1e-1], "grid": 10**4},
                           "eta_max": {"uniform": [0.01, 0.1], "grid": 10**4}}}}, 10**8),
    ({"search": {"space": {"lam": {"grid": "many"}, "x": 3}}}, 1),
])
def test_grid_size_is_counted_without_building_the_grid(doc, points):
    assert grid_size(doc) == points
