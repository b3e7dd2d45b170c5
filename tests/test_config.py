"""TrainConfig: the study's defaults, validation, TOML round trips, overrides, stable hash."""

from pathlib import Path

import pytest

from klayer.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_studys():
    c = TrainConfig()
    assert c.hidden_sizes == (50, 50) and c.batch_norm and c.init == "he"
    assert (c.lam, c.eta_min, c.eta_max, c.n_s, c.cycles, c.batch_size) == \
        (0.005, 1e-5, 1e-1, 2250, 2, 100)
    assert (c.protocol, c.n_val, c.subset) == ("full", 5000, None)
    assert c.total_steps == 9000


def test_eval_steps_cover_every_cycle():
    c = TrainConfig(n_s=2250, cycles=2, evals_per_cycle=10)
    steps = c.eval_steps()
    assert steps[0] == 0 and steps[-1] == 9000
    assert len(steps) == 21 and steps[1] == 450
    odd = TrainConfig(n_s=7, cycles=3, evals_per_cycle=4).eval_steps()
    assert odd[0] == 0 and odd[-1] == 42 and len(odd) == 13
    for cycle in range(3):
        assert sum(14 * cycle < s <= 14 * (cycle + 1) for s in odd) == 4


@pytest.mark.parametrize("field, value, allowed", [
    ("hidden_sizes", [50, 0], "hidden_sizes entries must be an integer >= 1"),
    ("hidden_sizes", "50,50", "list of positive integers"),
    ("batch_norm", "yes", "batch_norm must be true or false"),
    ("init", "glorot", "init must be one of he, xavier or a number"),
    ("init", -0.1, "init must be one of he, xavier"),
    ("dtype", "float16", "dtype must be one of float32, float64"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("lam", -0.1, "lam must be a finite number >= 0"),
    ("lam", float("nan"), "lam must be a finite number"),
    ("eta_max", 0, "eta_max must be a finite number > 0"),
    ("eta_min", 0.5, "eta_min (0.5) must not exceed eta_max"),
    ("n_s", 0, "n_s must be an integer >= 1"),
    ("cycles", 1.5, "cycles must be an integer >= 1"),
    ("batch_size", 1, "batch_size must be an integer >= 2"),
    ("schedule", "linear", "schedule must be one of cyclic, constant, step, cosine"),
    ("optimizer", "adagrad", "optimizer must be one of sgd, momentum, adam"),
    ("protocol", "half", "protocol must be one of full, single"),
    ("n_val", 0, "n_val must be an integer >= 1"),
    ("subset", 0, "subset must be an integer >= 1"),
    ("evals_per_cycle", True, "evals_per_cycle must be an integer"),
    ("out", "", "out must be a folder path"),
])
def test_bad_values_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=allowed.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_batch_size_one_is_fine_without_batch_norm():
    assert TrainConfig(batch_norm=False, batch_size=1).batch_size == 1


def test_toml_round_trip(tmp_path):
    c = TrainConfig(hidden_sizes=[30, 20, 10], batch_norm=False, init=1e-3, dtype="float32",
                    lam=0, subset=1000, data_dir='C:\\data "cifar" ünï', out=str(tmp_path))
    path = tmp_path / "c.toml"
    c.write_toml(path)
    back = TrainConfig.from_toml(path)
    assert back == c and back.lam == 0.0 and back.hidden_sizes == (30, 20, 10)
    assert back.config_hash() == c.config_hash()


def test_toml_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("hidden_sizes = [50]\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError,
                       match=r"bad.toml: unknown config key\(s\) learning_rate; allowed"):
        TrainConfig.from_toml(path)
    path.write_text("hidden_sizes = [50\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        TrainConfig.from_toml(path)
    path.write_text("n_s = 0\n")
    with pytest.raises(ValueError, match="bad.toml: config: n_s must be"):
        TrainConfig.from_toml(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


def test_overrides_and_replace():
    c = TrainConfig().with_overrides({"lam": 0.01, "n_s": None, "hidden_sizes": [10]})
    assert c.lam == 0.01 and c.n_s == 2250 and c.hidden_sizes == (10,)
    with pytest.raises(ValueError, match="unknown config option"):
        c.replace(momentum=0.9)
    with pytest.raises(ValueError, match="eta_min"):
        c.replace(eta_min=1.0)


def test_config_hash_is_stable_and_covers_results_only():
    c = TrainConfig()
    assert len(c.config_hash()) == 16 and int(c.config_hash(), 16) >= 0
    assert c.config_hash() == TrainConfig(hidden_sizes=[50, 50]).config_hash()
    assert c.config_hash() == c.replace(out="elsewhere", data_dir="/data").config_hash()
    for change in ({"lam": 0.006}, {"seed": 1}, {"hidden_sizes": (50,)}, {"dtype": "float64"},
                   {"batch_norm": False}, {"evals_per_cycle": 5}, {"subset": 100}):
        assert c.replace(**change).config_hash() != c.config_hash(), change


def test_config_hash_known_value():
    # Pinned: a change here invalidates every finished run that `reproduce` would reuse.
    assert TrainConfig(dtype="float64").config_hash() == "5ebb37a4f55e393e"


@pytest.mark.parametrize("name, hidden, bn", [
    ("3layer_bn", (50, 50), True), ("3layer_nobn", (50, 50), False),
    ("9layer_bn", (50, 30, 20, 20, 10, 10, 10, 10), True),
    ("9layer_nobn", (50, 30, 20, 20, 10, 10, 10, 10), False),
])
def test_standard_configs(name, hidden, bn):
    c = TrainConfig.from_toml(CONFIGS / f"{name}.toml")
    assert c.hidden_sizes == hidden and c.batch_norm is bn
    assert c.replace(hidden_sizes=(50, 50), batch_norm=True, dtype=TrainConfig().dtype) \
        == TrainConfig()


# Pinned before the options moved into field metadata: a change here would orphan every
# finished run that `klayer reproduce` and `klayer search` reuse by hash.
PINNED_HASHES = {
    "3layer_bn.toml": "5ebb37a4f55e393e",
    "3layer_nobn.toml": "bad82c75781ac7fb",
    "9layer_bn.toml": "8edc5bdbbcad7a44",
    "9layer_nobn.toml": "9370c8fff2d5e379",
    "best_mlp.toml": "15c71e06e08eb829",
    "best_mlp_v2.toml": "06cb219b7395b315",
    "best_mlp_v3.toml": "619c8f0a066ce2da",
    "best_mlp_v4.toml": "0473361dd32e11ca",
    "best_mlp_v5.toml": "4cb9ded76009d941",
    "best_mlp_v6.toml": "0f1cd31151e5ef44",
    "best_mlp_v7.toml": "a7bfa92199df3d97",
    "search_best_mlp_lr.toml": "dc46ea9b27f1fdf7",  # the base options, without [search]
    "search_lambda.toml": "9da1c25b85220fba",
    "search_lambda_fine.toml": "9da1c25b85220fba",
}


@pytest.mark.parametrize("name", sorted(PINNED_HASHES))
def test_config_files_keep_their_hash(name):
    import tomllib

    with open(CONFIGS / name, "rb") as f:
        doc = tomllib.load(f)
    doc.pop("search", None)
    assert TrainConfig.from_dict(doc).config_hash() == PINNED_HASHES[name]
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(PINNED_HASHES)


@pytest.mark.parametrize("change, expected", [
    ({}, "5ebb37a4f55e393e"),
    ({"init": 0.001}, "577081679854398c"),
    ({"subset": 100}, "859080a23758fc0d"),
    ({"layer_norm": True, "batch_norm": False}, "dd8ec0c82841bfbd"),
    ({"decay_every": 100, "schedule": "step"}, "7adbd922c1854adc"),
    ({"hidden_sizes": ()}, "9776917a39c89e66"),
])
def test_pinned_hashes_of_changed_defaults(change, expected):
    # pinned when float64 was the default dtype: these configurations name it
    assert TrainConfig(dtype="float64").replace(**change).config_hash() == expected


# A value other than the default (and the neutral value) for every option, with the
# companions some of them need to be valid.
CHANGED = {
    "hidden_sizes": ({"hidden_sizes": (20,)}),
    "batch_norm": {"batch_norm": False},
    "init": {"init": "xavier"},
    "dtype": {"dtype": "float64"},
    "seed": {"seed": 3},
    "lam": {"lam": 0.01},
    "optimizer": {"optimizer": "adam"},
    "schedule": {"schedule": "constant"},
    "eta_min": {"eta_min": 2e-5},
    "eta_max": {"eta_max": 0.2},
    "n_s": {"n_s": 100},
    "cycles": {"cycles": 3},
    "batch_size": {"batch_size": 50},
    "evals_per_cycle": {"evals_per_cycle": 5},
    "protocol": {"protocol": "single"},
    "n_val": {"n_val": 1000},
    "subset": {"subset": 500},
    "layer_norm": {"layer_norm": True, "batch_norm": False},
    "norm_position": {"norm_position": "after"},
    "residual": {"residual": True},
    "dropout": {"dropout": 0.1},
    "label_smoothing": {"label_smoothing": 0.1},
    "flip": {"flip": True},
    "translate": {"translate": 2},
    "jitter": {"jitter": 0.1},
    "decay_rate": {"decay_rate": 0.5},
    "decay_every": {"decay_every": 300},
    "warmup_steps": {"warmup_steps": 10, "schedule": "cosine"},
    "precise_bn": {"precise_bn": 5},
    "pad_mode": {"pad_mode": "reflect", "translate": 2},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "whiten": {"whiten": "zca"},
    "whiten_eps": {"whiten_eps": 0.1, "whiten": "zca"},
    "whiten_components": {"whiten_components": 256, "whiten": "pca"},
    "ema": {"ema": 0.999},
    "data_seed": {"data_seed": 3},
    "data_dir": {"data_dir": "/elsewhere"},
    "out": {"out": "runs/other"},
}
WHERE_ONLY = {"data_dir", "out"}  # where things are, not what is computed


def test_every_option_is_covered_by_the_hash_test():
    import dataclasses

    assert sorted(CHANGED) == sorted(f.name for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_options_that_change_results_change_the_hash(name):
    base = TrainConfig()
    if name == "warmup_steps":  # compare with its companion alone
        base = base.replace(schedule="cosine")
    if name == "layer_norm":
        base = base.replace(batch_norm=False)
    companions = {"pad_mode": {"translate": 2}, "whiten_eps": {"whiten": "zca"},
                  "whiten_components": {"whiten": "pca"}}
    base = base.replace(**companions.get(name, {}))
    changed = TrainConfig().replace(**CHANGED[name])
    assert changed != base
    if name in WHERE_ONLY:
        assert changed.config_hash() == base.config_hash()
    else:
        assert changed.config_hash() != base.config_hash()


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_flag_sets_its_option(name):
    """The flags are generated from the fields: each one reaches its option."""
    from klayer.config import add_option_flags, flag_name, flags_given
    import argparse

    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    argv = []
    for option, value in CHANGED[name].items():
        if isinstance(value, bool):
            argv.append(flag_name(option) if value else "--no-" + flag_name(option)[2:])
        elif isinstance(value, tuple):
            argv += [flag_name(option), ",".join(map(str, value))]
        else:
            argv += [flag_name(option), str(value)]
    given = flags_given(parser.parse_args(argv))
    assert TrainConfig().with_overrides(given) == TrainConfig().replace(**CHANGED[name])
    assert flags_given(parser.parse_args([])) == {}


def test_flag_names():
    from klayer.config import flag_name

    assert (flag_name("lam"), flag_name("hidden_sizes"), flag_name("n_s")) == \
        ("--lambda", "--hidden", "--n-s")


@pytest.mark.parametrize("text, widths", [
    ("50,50", (50, 50)), ("", ()), ("none", ()), (" 7 , 8 ", (7, 8)), ("100", (100,)),
])
def test_parse_widths(text, widths):
    from klayer.nn.checks import parse_widths

    assert parse_widths(text) == widths


@pytest.mark.parametrize("text", ["50,,50", "50,", ",50", "50,0", "50,-1", "5.5", "a,b",
                                  "²", "50;50"])
def test_parse_widths_rejects(text):
    from klayer.nn.checks import parse_widths

    with pytest.raises(ValueError, match="comma-separated positive integers"):
        parse_widths(text)


def test_config_files_that_are_not_toml_name_the_file(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"init = \"h\xe9\"\n")
    with pytest.raises(ValueError, match="latin.toml: not a TOML file"):
        TrainConfig.from_toml(latin)
    with pytest.raises(ValueError, match=f"config file {tmp_path} is a folder"):
        TrainConfig.from_toml(tmp_path)
    typed = tmp_path / "typed.toml"
    typed.write_text('n_s = "many"\nhidden_sizes = 50\n')
    with pytest.raises(ValueError, match="typed.toml: config: hidden_sizes must be a list"):
        TrainConfig.from_toml(typed)


def test_no_hidden_layer_needs_no_batch_of_two():
    assert TrainConfig(hidden_sizes=(), batch_size=1).batch_size == 1
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2 with batch norm"):
        TrainConfig(hidden_sizes=(10,), batch_size=1)
    with pytest.raises(ValueError, match="precise_bn .* needs batch_norm = true and a hidden"):
        TrainConfig(hidden_sizes=(), precise_bn=5)


@pytest.mark.parametrize("options, match", [
    ({"pad_mode": "reflect"}, "pad_mode 'reflect' says how translations pad; set translate"),
    ({"whiten_components": 100}, "whiten_components applies to whiten = \"pca\""),
    ({"whiten_components": 100, "whiten": "zca"}, "whiten_components applies to"),
    ({"whiten_eps": 0.1}, "whiten_eps applies to whitening"),
    ({"pad_mode": "wrap", "translate": 2}, "pad_mode must be one of mean, reflect, edge"),
    ({"ema": 1.0}, "ema must be a number in \\[0, 1\\)"),
    ({"mixup": -0.1}, "mixup must be a finite number >= 0"),
    ({"whiten": "pcaa"}, "whiten must be one of none, zca, pca"),
])
def test_lever_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)
    # the neutral values leave the hash of a config that never heard of them
    plain = TrainConfig(translate=2)
    assert plain.replace(pad_mode="mean", mixup=0.0, cutmix=0.0, whiten="none", ema=0.0,
                         whiten_eps=0.01).config_hash() == plain.config_hash()
