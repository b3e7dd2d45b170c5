"""The extended study (``klayer reproduce --extended``): what goes beyond batch norm.

On the study's 3-layer and 9-layer networks, with the study's protocol and budget, each
technique is one change to the baseline configuration (batch norm before the ReLU,
cyclical SGD), trained with the same seed:

- batch norm after the ReLU; layer norm instead of batch norm; residual connections;
- dropout; on-the-fly augmentation (flips and translations); label smoothing;
- Adam with cosine decay instead of cyclical SGD.

Every batch-norm run is then evaluated three ways, without training again: with the
moving averages (as trained), with PreciseBN statistics recomputed over training
batches, and with adaptive-BN statistics from the test images (transductive, labelled).
The new backward passes are gradient-checked on CIFAR-10 inputs first, with the usual
centred differences and with fourth-order ones: the usual formula's truncation error
(h² J⁽³⁾ / 6) reaches about 1e-7 for label smoothing and the combined network on some
inputs, and shrinks to ~1e-8 with the fourth-order formula, so that one is judged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from klayer.nn import gradcheck as G
from klayer.modelfile import read_model
from klayer.config import TrainConfig
from klayer.data import cifar_problem
from klayer.nn.network import Network
from klayer.search import dataset_for, make_executor
from klayer.study.sections import HIDDEN_3, Budget, Run, run_all

# (name, label, changes to the baseline configuration); the label names the run in the
# report (Run.label)
TECHNIQUES = [
    ("bn_after", "batch norm after the ReLU", {"norm_position": "after"}),
    ("layernorm", "layer norm instead of batch norm", {"batch_norm": False, "layer_norm": True}),
    ("residual", "residual connections", {"residual": True}),
    ("dropout", "dropout p = 0.1", {"dropout": 0.1}),
    ("augment", "augmentation: flips, translations ±2 px", {"flip": True, "translate": 2}),
    ("smoothing", "label smoothing ε = 0.1", {"label_smoothing": 0.1}),
    ("adam", "Adam, η = 1e-3 with cosine decay (not cyclical SGD)",
     {"optimizer": "adam", "schedule": "cosine", "eta_max": 1e-3, "eta_min": 1e-5}),
]

# Gradient checks of the new backward passes: (title, hidden sizes, Network options).
GRADCHECK_CASES = [
    ("batch norm after the ReLU", HIDDEN_3, {"norm_position": "after"}),
    ("layer norm", HIDDEN_3, {"batch_norm": False, "layer_norm": True}),
    ("layer norm after the ReLU", HIDDEN_3,
     {"batch_norm": False, "layer_norm": True, "norm_position": "after"}),
    ("dropout p = 0.3, one fixed mask", HIDDEN_3, {"dropout": 0.3}),
    ("label smoothing ε = 0.1", HIDDEN_3, {"label_smoothing": 0.1}),
    ("residual connections", None, {"residual": True}),
    ("all of them with batch norm after the ReLU", None,
     {"residual": True, "dropout": 0.3, "label_smoothing": 0.1, "norm_position": "after"}),
]

PRECISE_BATCHES = 200  # PreciseBN: 200 training batches of 100 (20,000 images)


@dataclass
class GradcheckCase:
    title: str
    hidden: tuple
    options: dict
    seed: int = 0
    rows: list = field(default_factory=list)  # fourth-order centred differences: judged
    rows_order2: list = field(default_factory=list)  # the usual centred differences: shown

    @property
    def worst_relative(self) -> float:
        return max(r.error for r in self.rows if r.kind == "relative")

    @property
    def worst_relative_order2(self) -> float:
        return max(r.error for r in self.rows_order2 if r.kind == "relative")

    @property
    def worst_absolute(self) -> float | None:
        errors = [r.error for r in self.rows if r.kind == "absolute"]
        return max(errors) if errors else None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


@dataclass
class BNEvaluation:
    """Test accuracy of one trained batch-norm run under three sets of statistics."""

    run: Run
    moving_average: float
    precise: float
    adaptive: float


@dataclass
class ExtendedResult:
    gradcheck: list  # GradcheckCase
    lam: float
    baselines: dict  # depth label -> (baseline Run with BN, Run without normalization)
    techniques: dict  # depth label -> [Run]
    bn_evaluations: list  # BNEvaluation
    precise_batches: int
    seconds: dict


def technique_runs(base: TrainConfig, prefix: str) -> list[Run]:
    return [Run(f"{prefix}_{name}", label, base.replace(**changes))
            for name, label, changes in TECHNIQUES]


def gradcheck_cases(budget: Budget, X, y, lam: float) -> list[GradcheckCase]:
    cases = []
    for title, hidden, options in GRADCHECK_CASES:
        hidden = tuple(hidden or budget.gradcheck_hidden_9)
        options = dict(options)
        batch_norm = options.pop("batch_norm", True)
        case = GradcheckCase(title, hidden, {"batch_norm": batch_norm, **options})
        # weights whose ReLU inputs keep clear of the kinks (see G.relu_margin)
        case.seed = G.seed_away_from_kinks(
            lambda seed: Network(X.shape[1], hidden, batch_norm=batch_norm, seed=seed,
                                 dtype="float64", **options), X)
        for order in (2, 4):
            rows = G.check_gradients_for(list(hidden), X, y, batch_norm=batch_norm, lam=lam,
                                         seed=case.seed, options=options, order=order)
            if order == 2:
                case.rows_order2 = rows
            else:
                case.rows = rows
        cases.append(case)
    return cases


def evaluate_statistics(study_runs: list[Run], data, batches: int = PRECISE_BATCHES
                        ) -> list[BNEvaluation]:
    """Moving averages, PreciseBN and adaptive BN test accuracy of each batch-norm run."""
    from klayer.levers.bn_stats import population_statistics, use_statistics

    evaluations = []
    for run in study_runs:
        if not run.config.batch_norm:
            continue
        net, _, _ = read_model(run.run_dir)
        X_train = data.X_train.astype(net.dtype, copy=False)
        X_test = data.X_test.astype(net.dtype, copy=False)
        moving = net.evaluate(X_test, data.y_test)["accuracy"]
        size = run.config.batch_size
        use_statistics(net, population_statistics(net, X_train, size, batches, seed=0))
        precise = net.evaluate(X_test, data.y_test)["accuracy"]
        use_statistics(net, population_statistics(net, X_test, size, None, seed=0))
        adaptive = net.evaluate(X_test, data.y_test)["accuracy"]
        evaluations.append(BNEvaluation(run, moving, precise, adaptive))
    return evaluations


def run_extended(out: Path, budget: Budget, base: TrainConfig, depth_pairs: dict,
                 workers: int = 1, emit=lambda msg: None) -> ExtendedResult:
    """Gradient checks, technique runs (trained or reused, ``workers`` at a time) and the
    statistics comparison.

    depth_pairs: {"3-layer": (BN run, no-BN run), "9-layer": (...)}, finished runs of the
    main study; their configurations give each depth's baseline.
    """
    seconds = {}
    t0 = time.perf_counter()
    emit("section vi: gradient checks of the new layers")
    X, y = cifar_problem(budget.gradcheck_dims, budget.gradcheck_samples, base.data_dir)
    lam = 0.01
    cases = gradcheck_cases(budget, X, y, lam)
    seconds["gradcheck"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    emit("section vi: technique runs on the 3-layer and 9-layer networks")
    techniques = {}
    for depth, (bn_run, _) in depth_pairs.items():
        prefix = "ext" + depth.split("-")[0]
        techniques[depth] = technique_runs(bn_run.config, prefix)
    executor = make_executor(workers)
    try:
        run_all([r for rs in techniques.values() for r in rs], Path(out) / "runs", executor,
                emit)
    finally:
        executor.close()
    seconds["runs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    emit("section vi: moving averages against PreciseBN and adaptive BN")
    data = dataset_for(base)
    bn_runs = [pair[0] for pair in depth_pairs.values()] + \
        [r for rs in techniques.values() for r in rs]
    evaluations = evaluate_statistics(bn_runs, data)
    seconds["statistics"] = time.perf_counter() - t0
    return ExtendedResult(cases, lam, dict(depth_pairs), techniques, evaluations,
                          PRECISE_BATCHES, seconds)

