"""How the cost of training grows with each size: step time and peak memory as one size
grows and the others stay at a base network, for klayer, PyTorch and JAX side by side.

The base: input 3,072, two hidden layers of 256 with batch norm, 10 classes, batch 256,
float32, plain SGD with the L2 term (λ = 0.005, η = 0.01), as ``bench_step.py``. Axes:

  width     hidden [w, w], w = 64 … 4096                  (per step)
  depth     k = 2 … 16 affine layers, hidden widths 256    (per step)
  batch     n = 32 … 1024                                  (per step)
  K         a population of K members (klayer.nn.population.Population; JAX: the same
            step vmapped over K stacked parameter sets), K = 1 … 64   (per step)
  examples  one epoch over N = 1,250 … 40,000 random examples: shuffle, gather each
            mini-batch into one reused buffer, step (per epoch)

Time: after a warm-up (and JAX's compilation), the median over repetitions (2 on the
examples axis) of the mean time per step (per epoch on the examples axis). Peak memory:
every point runs in a fresh process, which first runs two steps of a tiny network
(imports, thread pools, kernels: each library's fixed footprint), then resets the
kernel's peak resident set (Linux ``/proc/self/clear_refs``); the point's figure is the
peak at the end minus the resident set just before the network (and, on the examples
axis, the data set) was built: what the network, its optimizer, its data and a step's
temporaries take at their peak (for JAX, also the compiler's working memory).
``--threads N`` sets every library's compute threads (BLAS, OpenMP, XLA).

The fitted slope of log(time) against log(size) over each axis is set beside two
ideals: the nominal one (2 for width: the hidden-to-hidden products grow as w²; 1 for
the others) and the slope of the step's matrix-product flops over the same sizes (the
exact ideal for the arithmetic: with 3,072 inputs, the first layer's 3,072·w products
keep the width slope below 2 until w passes ~3,072).

Writes to --out: scaling.csv and scaling.json (one row per library and point),
scaling.png (log-log, one column per axis: time above, peak memory below) and
scaling.md (the machine, the command and the tables).

Run:  python benchmarks/scaling.py [--out docs/performance] [--libs klayer torch jax]
                                  [--threads 1] [--reps 3]
      python benchmarks/scaling.py --quick --out /tmp/scaling   # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LAM, LR, CLASSES = 0.005, 0.01, 10

FULL = {
    "base": {"input": 3072, "hidden": 256, "depth": 3, "batch": 256, "K": 1},
    "width": [64, 128, 256, 512, 1024, 2048, 4096],
    "depth": [2, 3, 4, 6, 8, 12, 16],
    "batch": [32, 64, 128, 256, 512, 1024],
    "K": [1, 2, 4, 8, 16, 32, 64],
    "examples": [1250, 2500, 5000, 10000, 20000, 40000],
}
QUICK = {
    "base": {"input": 48, "hidden": 16, "depth": 3, "batch": 16, "K": 1},
    "width": [8, 16, 32],
    "depth": [2, 3, 4],
    "batch": [8, 16, 32],
    "K": [1, 2, 4],
    "examples": [64, 128, 256],
}
AXES = ("width", "depth", "batch", "K", "examples")
NOMINAL = {"width": 2.0, "depth": 1.0, "batch": 1.0, "K": 1.0, "examples": 1.0}
LIBS = ("klayer", "torch", "jax")
SUPPORTS = {"klayer": set(AXES), "torch": set(AXES) - {"K"}, "jax": set(AXES)}


# --- one point --------------------------------------------------------------------


def point_shape(sizes: dict, axis: str, value: int) -> dict:
    """The network and batch of one point: the base with ``axis`` set to ``value``."""
    base = sizes["base"]
    width = value if axis == "width" else base["hidden"]
    depth = value if axis == "depth" else base["depth"]
    return {"layers": [base["input"], *[width] * (depth - 1), CLASSES],
            "batch": value if axis == "batch" else base["batch"],
            "K": value if axis == "K" else base["K"],
            "examples": value if axis == "examples" else None}


def step_flops(layers, n, k=1) -> float:
    """Flops of the matrix products of one step: 2·n·d·m per product, forward, dW, and dx
    except the first layer's (never computed); K members do K times the work."""
    return k * sum((2 if l == 0 else 3) * 2 * n * d * m
                   for l, (d, m) in enumerate(zip(layers[:-1], layers[1:])))


def axis_flops(sizes: dict, axis: str, value: int) -> float:
    s = point_shape(sizes, axis, value)
    flops = step_flops(s["layers"], s["batch"], s["K"])
    return flops * (s["examples"] // s["batch"] if s["examples"] else 1)


def rss_bytes() -> int:
    """The resident set size now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS bytes, Linux kB


def klayer_step(layers, k):
    """step(X, y) as the training loop makes it (the L2 term inside the SGD update)."""
    from klayer.nn.optim import SGD
    if k == 1:
        from klayer.nn.network import Network
        net = Network(layers[0], layers[1:-1], layers[-1], dtype="float32", seed=0)
        lam, loss_options = LAM, {"l2_gradient": False}
        l2 = net.l2_term(LAM)
    else:
        from klayer.nn.population import Population
        net = Population.build(k, layers[0], layers[1:-1], layers[-1], dtype="float32",
                               seed=list(range(k)))
        lam, loss_options, l2 = np.full(k, LAM), {}, None  # Population adds 2λW itself
    optimizer = SGD()

    def step(X, y):
        res = net.loss(X, y, lam, mode="train", check=False, **loss_options)
        net.update_running_stats(res.batch_stats)
        optimizer.step(net.params, res.grads, LR, **({"l2": l2} if l2 else {}))
    return step, lambda X, y: (X, y)


def torch_step(layers, k):
    import torch
    from bench_step import torch_model
    torch.set_num_threads(int(os.environ.get("KLAYER_SCALING_THREADS", os.cpu_count())))
    model = torch_model(layers).train()
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(X, y):
        opt.zero_grad(set_to_none=True)
        cost = torch.nn.functional.cross_entropy(model(X), y)
        cost = cost + LAM * sum((W * W).sum() for W in weights)
        cost.backward()
        opt.step()
    return step, lambda X, y: (torch.from_numpy(X), torch.from_numpy(y))


def jax_step(layers, k):
    import jax
    import peer_jax
    from klayer.nn.network import Network
    net = Network(layers[0], layers[1:-1], layers[-1], dtype="float32", seed=0)
    state = peer_jax.initial_state(net.params)
    if k > 1:  # K copies, stacked along a leading axis, one vmapped step
        state = jax.tree_util.tree_map(lambda a: jax.numpy.stack([a] * k), state)
    convert = lambda X, y: (jax.device_put(X), jax.device_put(y.astype(np.int32)))  # noqa: E731
    compiled = {}

    def step(X, y):
        nonlocal state
        if not compiled:
            compiled["step"] = peer_jax.make_step(state, X, y, LAM, LR, members=k)
        state = jax.block_until_ready(compiled["step"](state, X, y))
    return step, convert


BUILDERS = {"klayer": klayer_step, "torch": torch_step, "jax": jax_step}


def measure(lib: str, sizes: dict, axis: str, value: int, reps: int, budget: float) -> dict:
    """Time and peak memory of one point in this process (run it in a fresh one)."""
    s = point_shape(sizes, axis, value)
    layers, n, k = s["layers"], s["batch"], s["K"]
    rng = np.random.default_rng(0)
    sys.path.insert(0, str(HERE))
    _warm_up(lib, k)  # the libraries' own footprint is not the point's
    reset_peak()
    before = rss_bytes()
    if s["examples"]:
        data_X = rng.standard_normal((s["examples"], layers[0]), dtype=np.float32)
        data_y = rng.integers(0, CLASSES, s["examples"])
    step, convert = BUILDERS[lib](layers, k)
    if s["examples"]:
        gathered_X = np.empty((n, layers[0]), np.float32)
        gathered_y = np.empty(n, data_y.dtype)

        def run():  # one epoch
            order = rng.permutation(len(data_X))
            for i in range(0, len(order) - n + 1, n):
                np.take(data_X, order[i:i + n], axis=0, out=gathered_X)
                np.take(data_y, order[i:i + n], out=gathered_y)
                step(*convert(gathered_X, gathered_y))
        run()  # warm-up (and compilation)
        times = [_timed(run) for _ in range(min(reps, 2))]
    else:
        batches = [convert(rng.standard_normal((n, layers[0]), dtype=np.float32),
                           rng.integers(0, CLASSES, n)) for _ in range(4)]
        for i in range(3):
            step(*batches[i % 4])  # warm-up (and compilation)
        one = _timed(lambda: step(*batches[0]))
        steps = max(1, min(50, int(budget / max(one, 1e-6))))

        def run():
            for i in range(steps):
                step(*batches[i % 4])
        times = [_timed(run) / steps for _ in range(reps)]
    return {"lib": lib, "axis": axis, "size": value, "seconds": statistics.median(times),
            "best_seconds": min(times), "peak_bytes": peak_since_reset() - before,
            "flops": axis_flops(sizes, axis, value)}


def _warm_up(lib: str, k: int) -> None:
    """Two steps of a tiny network in ``lib`` (K members when k > 1): the imports, thread
    pools and kernels a library sets up once are then in place, not charged to the point."""
    step, convert = BUILDERS[lib]([8, 4, 4, CLASSES], min(k, 2))
    rng = np.random.default_rng(1)
    for _ in range(2):
        step(*convert(rng.standard_normal((4, 8), dtype=np.float32), rng.integers(0, 10, 4)))


def reset_peak() -> bool:
    """Reset the kernel's peak resident set (Linux: /proc/self/clear_refs, "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_since_reset() -> int:
    """The peak resident set since :func:`reset_peak` (VmHWM), else since the start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- all points, the fits and the outputs -------------------------------------------


def run_point(lib, axis, value, args) -> dict | None:
    """Run one point in a fresh process; None (with a note) if it fails."""
    cmd = [sys.executable, __file__, "--worker", lib, axis, str(value), "--reps", str(args.reps),
           "--budget", str(args.budget)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    if args.threads:  # every library's compute threads, set before it is imported
        env.update(OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), KLAYER_SCALING_THREADS=str(args.threads),
                   XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                              f"{'true' if args.threads > 1 else 'false'} "
                              f"intra_op_parallelism_threads={args.threads}").strip())
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {lib} {axis}={value} failed: {tail}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    """Least-squares slope of log y against log x (nan with fewer than 2 points)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def fits(rows, sizes) -> list[dict]:
    """Per axis: the ideal slopes and each library's fitted time and memory slopes."""
    table = []
    for axis in AXES:
        values = sizes[axis]
        entry = {"axis": axis, "range": f"{values[0]}–{values[-1]}", "nominal": NOMINAL[axis],
                 "flops": slope(values, [axis_flops(sizes, axis, v) for v in values])}
        for lib in LIBS:
            mine = sorted((r for r in rows if r["lib"] == lib and r["axis"] == axis),
                          key=lambda r: r["size"])
            entry[f"{lib}_time"] = slope([r["size"] for r in mine], [r["seconds"] for r in mine])
            mem = [r for r in mine if r["peak_bytes"] > 0]
            entry[f"{lib}_memory"] = slope([r["size"] for r in mem],
                                           [r["peak_bytes"] for r in mem])
        table.append(entry)
    return table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = "unknown (threadpoolctl not installed)"
    try:
        from threadpoolctl import threadpool_info
        blas = "; ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads, "
                         f"{i.get('architecture')})" for i in threadpool_info()
                         if i["user_api"] == "blas") or "none found"
    except ImportError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores; NumPy {np.__version__}, BLAS: {blas}; "
            f"Python {platform.python_version()}")


def _fmt(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_outputs(rows, sizes, args, started: str):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["lib", "axis", "size", "seconds", "best_seconds", "peak_bytes", "flops"]
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    table = fits(rows, sizes)
    (out / "scaling.json").write_text(json.dumps({"machine": machine(), "sizes": sizes,
                                                  "rows": rows, "slopes": table}, indent=1))
    plot(rows, sizes, out / "scaling.png")
    libs = [lib for lib in LIBS if any(r["lib"] == lib for r in rows)]
    base = sizes["base"]
    lines = [
        "# How the cost grows",
        "",
        f"Machine: {machine()}.",
        f"Run {started}: `python benchmarks/scaling.py{' --quick' if args.quick else ''}"
        f"{' --libs ' + ' '.join(args.libs) if tuple(args.libs) != LIBS else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}"
        f" --out {args.out}` ({args.reps} repetitions a point, load average "
        f"{args.load:.1f} at the start; "
        + (f"{args.threads} compute thread(s) per library" if args.threads
           else "each library's default threads") + ").",
        "",
        f"Base network: {base['input']} inputs, {base['depth'] - 1} hidden layers of "
        f"{base['hidden']} with batch norm, {CLASSES} classes, batch {base['batch']}, "
        "float32, SGD with λ Σ‖W‖²; each axis changes one size of it. Time is per step "
        "(per epoch on the examples axis); peak memory is the process's peak resident set "
        "above what it held before building the network (and the data set), each point in "
        "a fresh process. The figure is `scaling.png`, the numbers `scaling.csv`.",
        "",
        "## Fitted slopes of log(time) and log(peak memory) against log(size)",
        "",
        "Ideal: nominal (quadratic in width, linear in the rest) and the slope of the "
        "matrix-product flops over the same sizes.",
        "",
        "| axis | sizes | ideal nominal | ideal flops | "
        + " | ".join(f"{lib} time" for lib in libs) + " | "
        + " | ".join(f"{lib} memory" for lib in libs) + " |",
        "|---|---|---|---|" + "---|" * (2 * len(libs)),
    ]
    for e in table:
        lines.append(f"| {e['axis']} | {e['range']} | {_fmt(e['nominal'])} | {_fmt(e['flops'])} | "
                     + " | ".join(_fmt(e[f'{lib}_time']) for lib in libs) + " | "
                     + " | ".join(_fmt(e[f'{lib}_memory']) for lib in libs) + " |")
    lines += ["", "## The points", "",
              "| axis | size | " + " | ".join(f"{lib} ms" for lib in libs) + " | "
              + " | ".join(f"{lib} MB" for lib in libs) + " | GFLOP |",
              "|---|---|" + "---|" * (2 * len(libs) + 1)]
    by_key = {(r["lib"], r["axis"], r["size"]): r for r in rows}
    for axis in AXES:
        for v in sizes[axis]:
            got = [by_key.get((lib, axis, v)) for lib in libs]
            lines.append(f"| {axis} | {v} | "
                         + " | ".join(_fmt(r and r["seconds"] * 1e3, 3) for r in got) + " | "
                         + " | ".join(_fmt(r and r["peak_bytes"] / 1e6, 1) for r in got)
                         + f" | {axis_flops(sizes, axis, v) / 1e9:.3g} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    return table


def plot(rows, sizes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(AXES), figsize=(4 * len(AXES), 7))
    for c, axis in enumerate(AXES):
        values = sizes[axis]
        for lib, color in zip(LIBS, ("C0", "C1", "C2")):
            mine = sorted((r for r in rows if r["lib"] == lib and r["axis"] == axis),
                          key=lambda r: r["size"])
            if not mine:
                continue
            xs = [r["size"] for r in mine]
            axes[0, c].plot(xs, [r["seconds"] for r in mine], "o-", color=color, label=lib)
            mem = [r for r in mine if r["peak_bytes"] > 0]
            axes[1, c].plot([r["size"] for r in mem], [r["peak_bytes"] / 1e6 for r in mem],
                            "o-", color=color, label=lib)
        klayer = sorted((r for r in rows if r["lib"] == "klayer" and r["axis"] == axis),
                        key=lambda r: r["size"])
        if klayer:  # the flops curve through klayer's first point
            f0 = axis_flops(sizes, axis, klayer[0]["size"])
            axes[0, c].plot(values, [klayer[0]["seconds"] * axis_flops(sizes, axis, v) / f0
                                     for v in values], "k:", label="∝ flops")
        for r, label in ((0, "seconds per " + ("epoch" if axis == "examples" else "step")),
                         (1, "peak memory, MB")):
            ax = axes[r, c]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0, c].set_title(axis)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/performance", help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    parser.add_argument("--reps", type=int, default=3, help="repetitions a point (median)")
    parser.add_argument("--budget", type=float, default=0.2,
                        help="seconds a repetition aims at (more steps for fast points)")
    parser.add_argument("--threads", type=int,
                        help="compute threads of every library (default: each its own)")
    parser.add_argument("--worker", nargs=3, metavar=("LIB", "AXIS", "SIZE"),
                        help=argparse.SUPPRESS)  # one point, in this process
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.quick:  # seconds in all: fewer, shorter repetitions
        args.reps, args.budget = min(args.reps, 2), min(args.budget, 0.02)
    if args.worker:
        lib, axis, value = args.worker
        print(json.dumps(measure(lib, sizes, axis, int(value), args.reps, args.budget)))
        return
    args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for axis in AXES:
        for lib in args.libs:
            if axis not in SUPPORTS[lib]:
                continue
            for value in sizes[axis]:
                row = run_point(lib, axis, value, args)
                if row:
                    rows.append(row)
                    print(f"{lib:6s} {axis:8s} {value:6d}: {row['seconds'] * 1e3:10.3f} ms  "
                          f"{row['peak_bytes'] / 1e6:8.1f} MB", flush=True)
    table = write_outputs(rows, sizes, args, started)
    for e in table:
        print(f"{e['axis']:8s} ideal {e['nominal']:.2f} (flops {e['flops']:.2f}): "
              + ", ".join(f"{lib} time {_fmt(e[f'{lib}_time'])} memory "
                          f"{_fmt(e[f'{lib}_memory'])}" for lib in args.libs))
    print(f"wrote {args.out}/scaling.csv, scaling.json, scaling.png, scaling.md")


if __name__ == "__main__":
    main()
