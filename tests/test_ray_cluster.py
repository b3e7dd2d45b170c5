"""``klayer search --ray HOST:PORT`` on a real two-node Ray cluster started here.

The cluster is started with the ``ray`` CLI (token authentication, node addresses
127.0.0.1): a head node with no CPU, so that it runs no trial, and a worker node with one
CPU that runs from a Python environment of its own (a venv in which ``import klayer``
fails: it sees Ray, NumPy and klayer's other dependencies, not klayer) without
KLAYER_DATA. Every trial must run on that node, with the code the driver ships and the
data it sends; an audit hook in the node's environment records any file it opens in the
data folder. Ray 2.60's GCS and raylets listen on every interface whatever
``--node-ip-address`` says, so the nodes and the driver all run inside a network namespace
of their own (``ip netns``) whose only interface is the loopback: nothing they open can be
reached from outside this test. Within it: trials get the data through Ray's object store and
klayer's code with the job, and send their run folders back to the driver, which writes
them under its own (relative) ``--out``. Each node runs in its own process session,
which the test kills as a whole at the end, whatever happened (``ray stop`` would stop
every Ray process of this user on the machine, not only these).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from klayer import runs
from klayer.config import TrainConfig
from klayer.runs import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE

pytestmark = [pytest.mark.ray, pytest.mark.cifar, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
STARTED = "Ray runtime started"
_NAMESPACES = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("ray is not installed (pip install 'klayer[ray]')")
        pytest.skip("ray is not installed (pip install 'klayer[ray]')")
    return str(Path(sys.executable).with_name("ray"))


class Namespace:
    """A network namespace with only a loopback interface (needs root, as CI runs)."""

    def __init__(self):
        self.name = f"klayer-ray-{os.getpid()}-{next(_NAMESPACES)}"
        if os.geteuid() != 0 or shutil.which("ip") is None:
            reason = "the Ray cluster tests need root and iproute2 for a private network namespace"
            if os.environ.get("CI", "").lower() in ("true", "1"):
                pytest.fail(reason)
            pytest.skip(reason)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        self.prefix = ["ip", "netns", "exec", self.name]

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


class Cluster:
    """Ray nodes started with ``ray start --block`` in ``netns``, each in its own session."""

    def __init__(self, root: Path, netns: Namespace):
        self.root, self.nodes, self.netns = root, [], netns
        self.cli = ray_cli()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("KLAYER_DATA", "PYTHONPATH", "RAY_ADDRESS")}
        self.env["HOME"] = str(root / "home")  # the generated token stays in here
        Path(self.env["HOME"]).mkdir()
        token = subprocess.run([self.cli, "get-auth-token", "--generate"], env=self.env,
                               capture_output=True, text=True, check=True, timeout=60)
        self.env.update(RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=token.stdout.strip().splitlines()[-1])
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, *flags, cpus: int = 1, python: str | None = None, env=None) -> None:
        """A node; ``python``: the interpreter it runs (and starts its workers) with."""
        log = self.root / f"node{len(self.nodes)}.log"
        ray = [python, "-m", "ray.scripts.scripts"] if python else [self.cli]
        with open(log, "w") as f:
            node = subprocess.Popen(
                [*self.netns.prefix, *ray, "start", "--block", "--node-ip-address", "127.0.0.1",
                 "--num-cpus", str(cpus), "--temp-dir", str(self.root / "t"),
                 "--disable-usage-stats", *flags],
                env=env or self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.root)
        self.nodes.append(node)
        deadline = time.monotonic() + 60
        while STARTED not in log.read_text(errors="replace"):  # ray start reports readiness
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill every process of the nodes' sessions (the nodes and their workers)."""
        for node in self.nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=30)


# The worker node's environment: ``python -m venv`` without klayer. Ray must be the very
# version the head and the driver run (Ray refuses to mix versions), so the venv sees the
# installed packages through a path file, which puts their folder on sys.path without
# running the path files inside it: the editable install of klayer is one of those, so
# ``import klayer`` fails there. A second path file loads the node's test hooks.
NODE_HOOKS = '''
import os, signal, sys

_dir = os.environ.get("KLAYER_TEST_NODE_DIR")
if _dir:
    _data = os.environ.get("KLAYER_TEST_DATA_DIR") or "//none"

    def _audit(event, args):  # files opened in the data folder, by any process of the node
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_data):
                with open(os.path.join(_dir, "data-opened.txt"), "a") as f:
                    f.write(path + "\\n")

    sys.addaudithook(_audit)
    _kill = os.kill

    def _kill_once(pid, sig):  # with a "kill-once" file, KLAYER_FAULT kills one attempt only
        if pid == os.getpid() and sig == signal.SIGKILL and \\
                os.path.exists(os.path.join(_dir, "kill-once")):
            try:
                os.close(os.open(os.path.join(_dir, "killed"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return  # a worker was killed already: this attempt goes on
        _kill(pid, sig)

    os.kill = _kill_once
'''


def worker_environment(root: Path) -> str:
    """A venv without klayer (see above); returns its python."""
    import site
    import sysconfig

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    installed = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    (Path(purelib) / "installed.pth").write_text("\n".join(installed) + "\n")
    (Path(purelib) / "klayer_test_node.py").write_text(NODE_HOOKS)
    (Path(purelib) / "klayer_test_node.pth").write_text("import klayer_test_node\n")
    return str(python)


def node_ids(cluster) -> dict:
    """{"head": id, "worker": id}: the head node is the one without CPUs."""
    script = ("import json, ray; ray.init(address=%r, logging_level='error'); "
              "print(json.dumps([[n['NodeID'], n['Resources'].get('CPU', 0)] "
              "for n in ray.nodes() if n['Alive']]))" % cluster.address)
    done = subprocess.run([*cluster.netns.prefix, sys.executable, "-c", script],
                          env=cluster.env, capture_output=True, text=True, timeout=120,
                          cwd=cluster.root, check=True)
    nodes = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(cpus for _, cpus in nodes) == [0, 1], nodes
    return {("head" if cpus == 0 else "worker"): node for node, cpus in nodes}


@pytest.fixture(scope="module")
def cluster(cifar_dir):
    ray_cli()
    netns = Namespace()
    root = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # Ray's socket paths are short
    try:
        nodes = Cluster(root, netns)
        nodes.python = worker_environment(root)
        nodes.hooks = root / "hooks"
        nodes.hooks.mkdir()
        nodes.start("--head", "--port", str(nodes.port), "--include-dashboard", "false",
                    cpus=0)
        nodes.start("--address", nodes.address, cpus=1, python=nodes.python,
                    env={**nodes.env, "KLAYER_TEST_NODE_DIR": str(nodes.hooks),
                         "KLAYER_TEST_DATA_DIR": str(Path(cifar_dir).resolve())})
        nodes.ids = node_ids(nodes)
        yield nodes
    finally:
        if "nodes" in locals():
            nodes.stop()
        netns.delete()
        shutil.rmtree(root, ignore_errors=True)


def search(cluster, cifar_dir, cwd: Path, out: str, extra_env=None, netns=None,
           address=None):
    """``klayer search --ray`` (2 random λ draws of a tiny network) run from ``cwd``."""
    env = {**cluster.env, "PYTHONPATH": str(REPO), **(extra_env or {})}
    command = [*(netns or cluster.netns).prefix, sys.executable, "-m", "klayer.cli", "search",
               "--ray", address or cluster.address,
               "--out", out, "--method", "random", "--n-trials", "2",
               "--lambda-range", "1e-4,1e-1", "--batch-norm", "on", "--hidden", "8",
               "--n-s", "10", "--cycles", "1", "--subset", "500", "--evals-per-cycle", "2",
               "--data-dir", str(cifar_dir), "--quiet"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def table(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_worker_node_cannot_import_klayer_and_has_no_data_variable(cluster):
    done = subprocess.run([cluster.python, "-c", "import klayer"], cwd=cluster.root,
                          env=cluster.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "No module named 'klayer'" in done.stderr
    done = subprocess.run([cluster.python, "-c", "import ray, numpy, optuna, threadpoolctl; "
                           "print(ray.__version__)"], cwd=cluster.root, env=cluster.env,
                          capture_output=True, text=True, timeout=60)
    import ray

    assert done.returncode == 0 and done.stdout.strip() == ray.__version__, done.stderr
    assert "KLAYER_DATA" not in cluster.env and "PYTHONPATH" not in cluster.env


def test_trials_run_on_the_worker_node_and_land_under_the_drivers_out(cluster, cifar_dir,
                                                                      tmp_path):
    done = search(cluster, cifar_dir, tmp_path, "out")
    assert done.returncode == 0, done.stderr
    assert "2 trials (2 complete, 0 failed)" in done.stdout
    rows = table(tmp_path / "out")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert [r["node"] for r in rows] == [cluster.ids["worker"]] * 2  # the head has no CPU
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert run_dir.parent == tmp_path / "out" / "runs"  # absolute, under the driver's --out
        assert (run_dir / SUMMARY_FILE).is_file() and (run_dir / MODEL_FILE).is_file()
        assert TrainConfig.from_toml(run_dir / CONFIG_FILE).out == str(run_dir)
        assert runs.read_summary(run_dir)["node"] == cluster.ids["worker"]
    # the node read nothing of the data folder: the data came from the driver
    assert not (cluster.hooks / "data-opened.txt").exists()


def test_a_worker_killed_once_mid_trial_is_retried_within_the_search(cluster, cifar_dir,
                                                                      tmp_path):
    """KLAYER_FAULT kills the first attempt's worker at step 3 (the node's hook lets
    later attempts live): Ray runs the trial again and the search ends with status 0."""
    (cluster.hooks / "kill-once").touch()
    try:
        done = search(cluster, cifar_dir, tmp_path, "out", extra_env={"KLAYER_FAULT": "step:3"})
    finally:
        (cluster.hooks / "kill-once").unlink()
    assert (cluster.hooks / "killed").exists()  # a worker was killed, once
    (cluster.hooks / "killed").unlink()
    assert done.returncode == 0, done.stderr
    assert "2 trials (2 complete, 0 failed)" in done.stdout
    rows = table(tmp_path / "out")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert [r["node"] for r in rows] == [cluster.ids["worker"]] * 2
    for row in rows:
        assert runs.read_summary(row["run_dir"])["node"] == cluster.ids["worker"]


def test_a_worker_killed_mid_trial_fails_the_trial_and_a_rerun_finishes(cluster, cifar_dir,
                                                                       tmp_path):
    # every attempt of every trial kills its worker at step 3 (Ray's retries included)
    killed = search(cluster, cifar_dir, tmp_path, "out",
                    extra_env={"KLAYER_FAULT": "step:3"})
    assert killed.returncode == 1, killed.stderr  # no trial finished: no best configuration
    assert "2 trials (0 complete, 2 failed)" in killed.stdout
    assert [r["state"] for r in table(tmp_path / "out")] == ["FAIL", "FAIL"]

    again = search(cluster, cifar_dir, tmp_path, "out")
    assert again.returncode == 0, again.stderr
    assert "4 trials (2 complete, 0 failed, 2 failed and run again)" in again.stdout
    study = optuna.load_study(study_name="search",
                              storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    trials = study.get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(failed) == len(complete) == 2
    assert all("died" in t.user_attrs["fail_reason"].lower() or "crash" in
               t.user_attrs["fail_reason"].lower() for t in failed)
    assert sorted(t.system_attrs["failed_trial"] for t in complete) == \
        sorted(t.number for t in failed)
    assert {t.params["lam"] for t in complete} == {t.params["lam"] for t in failed}
    for row in table(tmp_path / "out"):
        if row["state"] == "COMPLETE":
            assert (Path(row["run_dir"]) / SUMMARY_FILE).is_file()


def test_no_cluster_at_the_address_is_one_line_naming_the_flag(cifar_dir, tmp_path):
    ray_cli()
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "klayer.cli", "search", "--ray", address, "--out", "out",
         "--lambda-range", "1e-4,1e-1", "--grid", "2", "--batch-norm", "on", "--hidden", "8",
         "--n-s", "10", "--cycles", "1", "--subset", "500", "--data-dir", str(cifar_dir),
         "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"klayer search: error: --ray {address}: no Ray cluster answers at this address; "
        "start one with `ray start --head` and pass its HOST:PORT, or use --ray local")


def test_ray_local_starts_an_instance_of_its_own(cifar_dir, tmp_path):
    """``--ray local``: the driver starts a Ray instance in its own process (here inside a
    namespace of its own, apart from the cluster's)."""
    ray_cli()
    netns = Namespace()
    try:
        env = Cluster.__new__(Cluster)  # only its environment: no nodes are started
        env.env = {k: v for k, v in os.environ.items()
                   if k not in ("KLAYER_DATA", "PYTHONPATH", "RAY_ADDRESS")}
        env.env["HOME"] = str(tmp_path / "home")
        done = search(env, cifar_dir, tmp_path, "out", netns=netns, address="local")
    finally:
        netns.delete()
    assert done.returncode == 0, done.stderr
    assert "2 trials (2 complete, 0 failed)" in done.stdout
    assert all(Path(r["run_dir"]).parent == tmp_path / "out" / "runs"
               for r in table(tmp_path / "out"))
