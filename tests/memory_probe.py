"""Run by tests/test_memory.py in a fresh process: the peak memory of one small run, as
tracemalloc counts it (NumPy reports every array it allocates to tracemalloc), beside
what klayer.memory.estimate says that run needs.

python tests/memory_probe.py KIND OPTIONS SIZES, with KIND solo (klayer.train.train), trial
(klayer.search.executors.run_trial, a search trial in the driver) or population
(klayer.train.train_population, one member per λ in OPTIONS["lams"]); OPTIONS a
TrainConfig as JSON; SIZES [n_train, n_val, n_test, d]. Prints JSON: "peak" (bytes held at
the peak, the data included), "estimate" (the estimate's total: for a population the data
once and everything else per member, as klayer.search.driver.group_configs counts it).
"""

import json
import sys
import tracemalloc
from types import SimpleNamespace

import numpy as np


def main(kind: str, options: dict, sizes: list) -> dict:
    from klayer import memory
    from klayer.config import TrainConfig

    lams = options.pop("lams", [options.get("lam", 0.0)])
    configs = [TrainConfig(**{**options, "lam": lam}) for lam in lams]
    n_train, n_val, n_test, d = sizes
    dtype = np.dtype(configs[0].dtype)
    rng = np.random.default_rng(0)
    tracemalloc.start()

    def split(n):
        return rng.standard_normal((n, d)).astype(dtype), rng.integers(0, 10, n)

    (X_train, y_train), (X_val, y_val), (X_test, y_test) = (split(n_train), split(n_val),
                                                            split(n_test))
    data = SimpleNamespace(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val,
                           X_test=X_test, y_test=y_test, standardizer=None,
                           class_names=[str(c) for c in range(10)])
    tracemalloc.reset_peak()  # the data stays counted; generating it does not
    if kind == "solo":
        from klayer.train import train

        train(configs[0], data)
    elif kind == "population":
        from klayer.train import train_population

        train_population(configs, data)
    elif kind == "trial":
        from klayer.search.executors import run_trial

        run_trial({"configs": [configs[0].to_dict()], "run_dirs": [None], "blas_threads": 1}, data)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    peak = tracemalloc.get_traced_memory()[1]
    parts = [memory.estimate(c, n_train=n_train, n_val=n_val, n_test=n_test, input_size=d)
             for c in configs]
    total = sum(parts[0].values()) + sum(sum(p.values()) - p["data"] for p in parts[1:])
    return {"peak": peak, "estimate": total}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))))
