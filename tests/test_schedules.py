"""Learning-rate schedules: the triangular cycle's corners, slopes and period."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klayer.config import TrainConfig
from klayer.schedules import ConstantLR, CyclicLR, make_schedule

ETA_MIN, ETA_MAX, N_S = 1e-5, 1e-1, 2250


def test_cyclic_corners_match_spec():
    eta = CyclicLR(ETA_MIN, ETA_MAX, N_S)
    assert eta(0) == ETA_MIN
    assert eta(N_S) == pytest.approx(ETA_MAX, rel=1e-15)
    assert eta(2 * N_S) == ETA_MIN
    assert eta(3 * N_S) == pytest.approx(ETA_MAX, rel=1e-15)  # second cycle
    assert eta(4 * N_S) == ETA_MIN


def test_cyclic_mid_slopes_are_linear():
    eta = CyclicLR(ETA_MIN, ETA_MAX, N_S)
    assert eta(N_S // 2) == pytest.approx((ETA_MIN + ETA_MAX) / 2, rel=1e-14)  # N_S even
    assert eta(1000) == pytest.approx(ETA_MIN + 1000 / N_S * (ETA_MAX - ETA_MIN), rel=1e-14)
    assert eta(N_S + 1000) == pytest.approx(ETA_MAX - 1000 / N_S * (ETA_MAX - ETA_MIN), rel=1e-14)
    assert CyclicLR(0.0, 1.0, 10)(5) == 0.5
    assert CyclicLR(0.0, 1.0, 10)(15) == 0.5


@given(st.integers(0, 10 ** 6), st.integers(1, 5000))
def test_cyclic_bounded_periodic_symmetric(step, n_s):
    eta = CyclicLR(ETA_MIN, ETA_MAX, n_s)
    assert ETA_MIN <= eta(step) <= ETA_MAX
    assert eta(step) == eta(step + 2 * n_s)
    t = step % (2 * n_s)
    assert eta(t) == pytest.approx(eta(2 * n_s - t), rel=1e-14)  # falling half mirrors rising


def test_constant_and_config():
    assert ConstantLR(0.01)(0) == ConstantLR(0.01)(12345) == 0.01
    assert make_schedule(TrainConfig()) == CyclicLR(ETA_MIN, ETA_MAX, N_S)
    assert make_schedule(TrainConfig(schedule="constant", eta_max=0.02)) == ConstantLR(0.02)
