"""``klayer search --ray HOST:PORT`` on a real two-node Ray cluster started here.

The cluster is started with the ``ray`` CLI (a head node and a second node, one CPU each,
token authentication, node addresses 127.0.0.1) in an environment without KLAYER_DATA or
klayer on the path. Ray 2.60's GCS and raylets listen on every interface whatever
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

from klayer.config import TrainConfig
from klayer.runs import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE

pytestmark = pytest.mark.ray
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

    def start(self, *flags) -> None:
        log = self.root / f"node{len(self.nodes)}.log"
        with open(log, "w") as f:
            node = subprocess.Popen(
                [*self.netns.prefix, self.cli, "start", "--block", "--node-ip-address", "127.0.0.1",
                 "--num-cpus", "1", "--temp-dir", str(self.root / "t"),
                 "--disable-usage-stats", *flags],
                env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
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


@pytest.fixture(scope="module")
def cluster():
    ray_cli()
    netns = Namespace()
    root = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # Ray's socket paths are short
    try:
        nodes = Cluster(root, netns)
        nodes.start("--head", "--port", str(nodes.port), "--include-dashboard", "false")
        nodes.start("--address", nodes.address)
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


def test_trials_run_on_the_cluster_and_land_under_the_drivers_out(cluster, cifar_dir,
                                                                   tmp_path):
    done = search(cluster, cifar_dir, tmp_path, "out")
    assert done.returncode == 0, done.stderr
    assert "2 trials (2 complete, 0 failed)" in done.stdout
    rows = table(tmp_path / "out")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert run_dir.parent == tmp_path / "out" / "runs"  # absolute, under the driver's --out
        assert (run_dir / SUMMARY_FILE).is_file() and (run_dir / MODEL_FILE).is_file()
        assert TrainConfig.from_toml(run_dir / CONFIG_FILE).out == str(run_dir)


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
