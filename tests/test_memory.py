"""klayer.memory: what a run needs, known before it is spent; the search grid limit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klayer import memory
from klayer.commands.search import grid_size
from klayer.config import TrainConfig
from klayer.nn.network import Network

GIB = 2**30
REPO = Path(__file__).resolve().parent.parent
# The estimate against the measured peak (tracemalloc, in a fresh process): within this
# fraction either way. It counts the large arrays only, and an evaluation chunk's arrays
# as a training batch's (eval mode keeps fewer), so it is high for wide networks.
MARGIN = 0.35


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


# --- the estimate against real runs ------------------------------------------------------

SMALL = {"hidden_sizes": [256, 128], "n_s": 20, "cycles": 1, "evals_per_cycle": 2}
SIZES = [2000, 500, 500, 3072]  # n_train, n_val, n_test, d: CIFAR-10's rows, fewer


def measured(kind: str, options: dict, sizes=SIZES) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), kind,
                           json.dumps(options), json.dumps(sizes)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("kind, options", [
    ("solo", {**SMALL, "dtype": "float32"}),
    ("solo", {**SMALL, "hidden_sizes": [1000, 1000], "batch_size": 500, "n_s": 5,
              "dtype": "float64", "optimizer": "adam"}),
    ("solo", {**SMALL, "hidden_sizes": [512], "batch_size": 200, "dropout": 0.3,
              "optimizer": "momentum", "dtype": "float32"}),
    ("trial", {**SMALL, "dtype": "float32"}),
    ("population", {**SMALL, "dtype": "float32", "lams": [0.0, 1e-3, 1e-2, 1e-1]}),
], ids=["solo", "solo-wide-adam-float64", "solo-dropout-momentum", "search-trial",
        "population-of-4"])
def test_the_estimate_is_the_peak_of_a_real_run_within_the_margin(kind, options):
    """A small real run (generated data of CIFAR-10's width) in a fresh process: its
    peak (every NumPy array, the data included) is the estimate within MARGIN."""
    run = measured(kind, options)
    ratio = run["peak"] / run["estimate"]
    assert 1 - MARGIN <= ratio <= 1 + MARGIN, run


@pytest.mark.parametrize("options", [
    {}, {"hidden_sizes": (300, 100), "dtype": "float64"},
    {"batch_norm": False, "layer_norm": True, "hidden_sizes": (30, 20, 10)},
])
def test_the_gradients_figure_is_the_bytes_of_a_real_backward_pass(options):
    config = TrainConfig(**options)
    net = Network(64, config.hidden_sizes, 10, batch_norm=config.batch_norm,
                  layer_norm=config.layer_norm, dtype=config.dtype)
    rng = np.random.default_rng(0)
    result = net.loss(rng.standard_normal((8, 64)).astype(config.dtype),
                      rng.integers(0, 10, 8), lam=0.01)
    assert set(result.grads) == set(net.params)
    assert memory.estimate(config, input_size=64)["gradients"] == \
        sum(g.nbytes for g in result.grads.values())
