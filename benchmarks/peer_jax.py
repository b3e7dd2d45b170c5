"""The training step of ``bench_step.py`` in JAX: one jit-compiled XLA program (CPU, float32).

The same work as klayer's step and PyTorch's: forward + backward of the cost
J = mean cross-entropy + λ Σ_l ||W_l||² through Linear → batch norm (training mode:
batch mean and biased 1/n batch variance, ε = 1e-5) → ReLU … Linear; the moving
averages μ_av = α μ_av + (1 - α) μ (α = 0.9; the first step takes the batch's own
statistics, as ``Network.update_running_stats`` does); then plain SGD p -= η g.
Parameters keep klayer's names and shapes (W_l: (m_l, m_{l-1}), s = x W^T + b), so a
klayer network's parameters copy across unchanged.

The whole step (gradient, SGD and moving averages) is one compiled function
``step(state, X, y) -> state`` whose input state is donated: XLA may write the new
parameters into the old ones' buffers, as klayer and torch update in place.

Run:  python benchmarks/peer_jax.py --check          # agree with klayer over 3 steps
      python benchmarks/peer_jax.py [--reps 7] [--steps N] [--cases 0 1 2]   # time
Needs jax (``pip install -e ".[bench]"``) and, for the cases, bench_step.py's imports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from klayer.nn.network import Network

# --- the step -----------------------------------------------------------------------


def initial_state(params: dict) -> dict:
    """A step's state from klayer-named parameters (``W1, b1, gamma1, beta1, ..., Wk,
    bk``; NumPy or JAX arrays): {"params", "buffers", "alpha"}.

    The moving averages start at zero with ``alpha`` 0 for the first step, so that the
    first step stores its batch's statistics; each step sets ``alpha`` to α for the next.
    """
    # Copies: on CPU jnp.asarray may share a NumPy array's memory, and the step donates
    # (overwrites) its state.
    params = {name: jnp.array(p, jnp.float32, copy=True) for name, p in params.items()}
    k = sum(name.startswith("W") for name in params)
    buffers = {}
    for l in range(1, k):
        if f"gamma{l}" in params:
            buffers[f"running_mean{l}"] = jnp.zeros_like(params[f"gamma{l}"])
            buffers[f"running_var{l}"] = jnp.zeros_like(params[f"gamma{l}"])
    return {"params": params, "buffers": buffers, "alpha": jnp.float32(0.0)}


def _forward(params, X, eps):
    """Scores for X: (n, d) in training mode -> (scores (n, C), {l: (μ_l, v_l)}, [the
    pre-ReLU values γ ⊙ ŝ + β of each hidden layer])."""
    k = sum(name.startswith("W") for name in params)
    h, stats, pre = X, {}, []
    for l in range(1, k):
        s = h @ params[f"W{l}"].T + params[f"b{l}"]
        mean = s.mean(axis=0)
        centred = s - mean
        var = (centred * centred).mean(axis=0)  # biased: 1/n
        s_hat = centred * jax.lax.rsqrt(var + eps)
        pre.append(params[f"gamma{l}"] * s_hat + params[f"beta{l}"])
        h = jax.nn.relu(pre[-1])
        stats[l] = (mean, var)
    return h @ params[f"W{k}"].T + params[f"b{k}"], stats, pre


def _cost(params, X, y, lam, eps):
    """J for X: (n, d), y: (n,) int32 -> (J, {l: (μ_l, v_l)}) with batch-norm statistics."""
    scores, stats, _ = _forward(params, X, eps)
    log_p = jax.nn.log_softmax(scores, axis=1)
    loss = -jnp.take_along_axis(log_p, y[:, None], axis=1).mean()
    k = len(stats) + 1
    penalty = sum(jnp.vdot(params[f"W{l}"], params[f"W{l}"]) for l in range(1, k + 1))
    return loss + lam * penalty, stats


def make_step(example_state: dict, X, y, lam: float, lr: float, *, eps: float = 1e-5,
              alpha: float = 0.9, members: int = 1):
    """One training step ``step(state, X, y) -> state``, compiled ahead of time for the
    shapes of ``example_state``, X: (n, d) float32 and y: (n,) int32.

    ``members`` K > 1: the state's arrays are K states stacked along a leading axis, and
    the step is vmapped over it with X and y shared (a population, as
    ``klayer.nn.population.Population`` trains one).
    The state passed in is donated: do not use it after the call.
    """
    def step(state, X, y):
        grads, stats = jax.grad(_cost, has_aux=True)(state["params"], X, y, lam, eps)
        params = {name: p - lr * grads[name] for name, p in state["params"].items()}
        a, old, buffers = state["alpha"], state["buffers"], {}
        for l, (mean, var) in stats.items():
            buffers[f"running_mean{l}"] = a * old[f"running_mean{l}"] + (1 - a) * mean
            buffers[f"running_var{l}"] = a * old[f"running_var{l}"] + (1 - a) * var
        return {"params": params, "buffers": buffers, "alpha": jnp.float32(alpha)}

    if members > 1:
        step = jax.vmap(step, in_axes=(0, None, None))
    return jax.jit(step, donate_argnums=0).lower(example_state, X, y).compile()


def device_batches(batches):
    """[(X (n, d), y (n,))] NumPy mini-batches -> the same as float32 / int32 JAX arrays
    (which may share X's memory: nothing writes to the batches)."""
    return [(jax.device_put(np.asarray(X, np.float32)), jax.device_put(np.asarray(y, np.int32)))
            for X, y in batches]


def step_fn(sizes, batches, lam: float, lr: float, seed: int = 0):
    """``step(i)`` for bench_step.py's timing loop: one training step on
    ``batches[i % len(batches)]``, returning when its result is computed.

    The network starts from klayer's initial parameters (``Network(..., seed=seed)``).
    Every call waits for its step (``block_until_ready``), as klayer's and torch's steps
    return finished: the time per step includes dispatching the compiled program.
    """
    net = Network(sizes[0], sizes[1:-1], sizes[-1], batch_norm=True, dtype="float32", seed=seed)
    tb = device_batches(batches)
    state = initial_state(net.params)
    step = make_step(state, *tb[0], lam, lr)

    def run(i):
        nonlocal state  # each call replaces it: the old state is donated to the step
        X, y = tb[i % len(tb)]
        state = jax.block_until_ready(step(state, X, y))
    return run


# --- agreement with klayer ----------------------------------------------------------


def check(sizes, n: int, lam: float, lr: float, rng, steps: int = 3, rtol: float = 1e-4,
          update_rtol: float = 1e-3, noise: float = 1e-6, tries: int = 20):
    """Run ``steps`` steps in klayer (float32, as bench_step.py's klayer step) and in JAX
    from the same parameters on the same random batches of n, then compare every
    parameter and moving average. Returns ({name: (value difference, update
    difference)}, {name: noise of the cancelled biases}, the number of batches redrawn):

    - value: max |jax - klayer| / max |klayer|, at most ``rtol``;
    - update: the same for the change over the steps, Δ = p_final - p_initial (the
      moving averages' initial value is the first batch's statistics), at most
      ``update_rtol`` give or take the float32 rounding of p itself at each step
      (steps · ε · max |p|, ε = 2⁻²³; it dominates where Δ is small against p, as for
      γ near 1). It tests the gradients, which the values hide under the initial weights.

    The biases b_l that feed batch norm are the exception: their gradient is 0 exactly
    (``Network.bias_cancelled``), so both libraries leave them at float32 rounding noise
    around 0: max(|jax|, |klayer|) is at most ``noise``.

    A batch on which the two libraries' ReLUs disagree (a pre-activation within float32
    rounding of 0, positive in one and not in the other) is redrawn: there the cost has
    a kink, and one unit switched on in one library alone changed the 9-layer network's
    gradients by up to 10%. Raises AssertionError on any disagreement.
    """
    net = Network(sizes[0], sizes[1:-1], sizes[-1], batch_norm=True, dtype="float32", seed=0)
    state = initial_state(net.params)

    def draw():
        return random_batches(sizes, n, 1, rng)[0]

    step = make_step(state, *device_batches([draw()])[0], lam, lr, eps=net.bn_eps,
                     alpha=net.bn_alpha)
    pre_activations = jax.jit(lambda params, X: _forward(params, X, net.bn_eps)[2])
    start = {name: p.copy() for name, p in net.params.items()}
    redrawn = 0
    for i in range(steps):
        for _ in range(tries):
            X, y = draw()
            caches = net.forward(X, "train", check=False).caches[:-1]
            pre = pre_activations(state["params"], jnp.asarray(X))
            if all(np.array_equal(c.relu > 0, np.asarray(p) > 0) for c, p in zip(caches, pre)):
                break
            redrawn += 1
        else:
            raise AssertionError(f"the ReLUs disagree on {tries} batches in a row: "
                                 "more than rounding")
        res = net.loss(X, y, lam, mode="train", check=False)
        net.update_running_stats(res.batch_stats)
        if i == 0:
            start.update({name: b.copy() for name, b in net.buffers.items()})
        for name, g in res.grads.items():
            net.params[name] -= lr * g
        state = step(state, *device_batches([(X, y)])[0])
    ours = {**state["params"], **state["buffers"]}
    theirs = {**net.params, **net.buffers}
    assert ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
    cancelled = {f"b{l}" for l in range(1, net.num_layers + 1) if net.bias_cancelled(l)}
    diffs, noises, bad = {}, {}, []
    for name, want in theirs.items():
        got = np.asarray(ours[name])
        assert got.dtype == want.dtype == np.float32, (name, got.dtype, want.dtype)
        if name in cancelled:
            noises[name] = float(max(np.abs(got).max(), np.abs(want).max()))
            bad += [name] if not noises[name] <= noise else []
            continue
        change, their_change = got - start[name], want - start[name]
        diffs[name] = (_relative(got, want), _relative(change, their_change))
        allowed = (update_rtol * np.abs(their_change).max()
                   + steps * np.finfo(np.float32).eps * np.abs(want).max())
        bad += [name] if not (diffs[name][0] <= rtol and
                              np.abs(change - their_change).max() <= allowed) else []
    assert not bad, f"JAX and klayer disagree: {bad} {diffs} {noises}"
    return diffs, noises, redrawn


def _relative(got, want):
    """max |got - want| / max |want|."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# --- timing -------------------------------------------------------------------------


def time_steps(run, steps: int) -> float:
    """Wall time of ``steps`` consecutive calls ``run(i)``, divided by ``steps``."""
    t0 = time.perf_counter()
    for i in range(steps):
        run(i)
    return (time.perf_counter() - t0) / steps


def random_batches(sizes, n, count, rng):
    """``count`` mini-batches of n random float32 inputs and integer labels."""
    return [(rng.standard_normal((n, sizes[0]), dtype=np.float32),
             rng.integers(0, sizes[-1], n)) for _ in range(count)]


def run_cases(cases, reps: int, steps: int | None, *, input_size: int, classes: int,
              lam: float, lr: float, n_batches: int = 8, seed: int = 0) -> list[float]:
    """Median seconds per JAX step of each case ``(name, hidden, n, steps)`` (the layout
    of bench_step.py's CASES) over ``reps`` repetitions of ``steps`` steps (None: the
    case's own), after compilation and a warm-up of 20 steps."""
    rng = np.random.default_rng(seed)
    medians = []
    for _name, hidden, n, case_steps in cases:
        sizes = [input_size, *hidden, classes]
        run = step_fn(sizes, random_batches(sizes, n, n_batches, rng), lam, lr)
        time_steps(run, 20)
        medians.append(statistics.median(time_steps(run, steps or case_steps)
                                         for _ in range(reps)))
    return medians


def main():
    # bench_step.py defines the cases and constants: one source for both scripts.
    from bench_step import CASES, CLASSES, INPUT, LAM, LR, N_BATCHES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare 3 steps with klayer's on every case, then stop")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (median taken)")
    parser.add_argument("--steps", type=int, help="steps per repetition (default: the case's)")
    parser.add_argument("--cases", type=int, nargs="*", help="case indices to run (default all)")
    args = parser.parse_args()

    selected = [CASES[c] for c in (args.cases if args.cases is not None else range(len(CASES)))]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__}, devices {jax.devices()}, cpu_count {os.cpu_count()}, "
          f"float32; median of {args.reps} repetitions; load average {load:.1f} at start\n")
    if args.check:
        rng = np.random.default_rng(0)
        for name, hidden, n, _ in selected:
            sizes = [INPUT, *hidden, CLASSES]
            diffs, noises, redrawn = check(sizes, n, LAM, LR, rng)
            print(f"{name}: 3 steps agree with klayer ({redrawn} batch(es) redrawn on a "
                  "ReLU kink). Max relative difference:")
            for what, names in (("parameters", [k for k in diffs if k[0] != "r"]),
                                ("moving averages", [k for k in diffs if k[0] == "r"])):
                value = max(names, key=lambda k: diffs[k][0])
                update = max(names, key=lambda k: diffs[k][1])
                print(f"  {what}: values {diffs[value][0]:.1e} ({value}), "
                      f"updates {diffs[update][1]:.1e} ({update})")
            print(f"  biases before batch norm ({', '.join(noises)}): largest |b| "
                  f"{max(noises.values()):.1e} in either (0 in exact arithmetic)")
        return
    medians = run_cases(selected, args.reps, args.steps, input_size=INPUT, classes=CLASSES,
                        lam=LAM, lr=LR, n_batches=N_BATCHES)
    print("| case | batch | jax ms/step |")
    print("|---|---|---|")
    for (name, _, n, _), t in zip(selected, medians):
        print(f"| {name} | {n} | {t * 1e3:.3f} |")


if __name__ == "__main__":
    main()
