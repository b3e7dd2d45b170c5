"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def real_cifar_path() -> Path:
    """Where the real CIFAR-10 batches are looked for: $KLAYER_DATA, else
    ../shared/data/cifar-10-batches-py beside the repository."""
    env = os.environ.get("KLAYER_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py"
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    return path


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 python batches (:func:`real_cifar_path`). Skips the test when
    absent (fails instead when $CI is true/1)."""
    path = real_cifar_path()
    if not (path / "data_batch_1").is_file():
        reason = f"CIFAR-10 not found at {path} (set KLAYER_DATA to its cifar-10-batches-py)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def data():
    """Small generated data for training tests: four classes decided by the signs of two
    of 20 Gaussian inputs; 200 train / 100 validation / 100 test rows."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 20))
    y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)
    return SimpleNamespace(X_train=X[:200], y_train=y[:200], X_val=X[200:300],
                           y_val=y[200:300], X_test=X[300:], y_test=y[300:])


def needed(modules: list[str], install: str, what: str):
    """The imported ``modules``, or a skip with a printed reason on a developer machine
    without them; under CI (CI=true) their absence is a failure."""
    import importlib

    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError:
        reason = f"{' or '.join(modules)} not installed: {install}"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"CI must run the {what}: {reason}")
        print(f"\nskipping one of the {what}: {reason}")
        pytest.skip(reason)


def torch_or_skip():
    """PyTorch, the test-only oracle (see :func:`needed`)."""
    return needed(["torch"], "pip install torch==2.13.0 (CPU build)", "PyTorch oracle tests")[0]


def onnx_or_skip():
    """(onnx, onnxruntime) for the export tests (see :func:`needed`)."""
    onnx, onnxruntime = needed(["onnx", "onnxruntime"], 'pip install "klayer[onnx]"',
                               "ONNX export tests")
    return onnx, onnxruntime


@pytest.fixture
def require_torch():
    return torch_or_skip()


# Property tests draw new examples on every run locally; under CI they are derandomised
# so that a green build is reproducible.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() in ("1", "true"):
    _hypothesis_settings.load_profile("ci")


# --- the `cifar` marker is where the real data is -------------------------------------------
# A test that takes the `cifar_dir` fixture, or that opens a file of the real CIFAR-10 in
# the test process (an audit hook sees every open), fails unless it is marked `cifar`, so
# that `-m "not cifar"` really runs without the data. (Files opened by a child process
# are not seen; such tests get the folder through `cifar_dir`, which is checked.)

_DATA_OPENED: list = []  # paths of the real data opened while the current test runs
_REAL_DATA = [str(real_cifar_path().resolve())]


def _audit_data(event: str, args) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError, OSError):
            return
        if path.startswith(_REAL_DATA[0] + os.sep):
            _DATA_OPENED.append(path)


sys.addaudithook(_audit_data)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _DATA_OPENED.clear()
    if "cifar_dir" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("cifar"):
        pytest.fail("this test takes the real CIFAR-10 (cifar_dir) but is not marked "
                    "@pytest.mark.cifar", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    result = yield
    opened = sorted(set(_DATA_OPENED))
    _DATA_OPENED.clear()
    if opened and not item.get_closest_marker("cifar"):
        pytest.fail(f"this test opened the real CIFAR-10 ({opened[0]}) but is not marked "
                    "@pytest.mark.cifar", pytrace=False)
    return result


class Stop(Exception):
    """Raised by :func:`stop_at`'s callback: training interrupted on purpose."""


def stop_at(step: int):
    """A training callback that raises :class:`Stop` right after update step ``step``."""
    def callback(event):
        if event.kind == "step" and event.step == step:
            raise Stop
    return callback
