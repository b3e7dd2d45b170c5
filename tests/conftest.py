"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 python batches: $KLAYER_DATA, else ../shared/data/cifar-10-batches-py
    beside the repository. Skips the test when absent (fails instead when $CI is true/1)."""
    env = os.environ.get("KLAYER_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py"
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    if not (path / "data_batch_1").is_file():
        reason = f"CIFAR-10 not found at {path} (set KLAYER_DATA to its cifar-10-batches-py)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


# Property tests draw new examples on every run locally; under CI they are derandomised
# so that a green build is reproducible.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() in ("1", "true"):
    _hypothesis_settings.load_profile("ci")
