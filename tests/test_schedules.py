"""Learning-rate schedules: the triangular cycle's corners, slopes and period."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from klayer.config import TrainConfig
from klayer.nn.schedules import (
    ConstantLR, CosineLR, CyclicLR, PerMember, StepLR, WarmUp, make_schedule,
)

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



# --- step decay, cosine decay, warm-up ---------------------------------------------------


def test_step_decay_drops_by_rate_every_interval():
    eta = StepLR(0.1, 0.5, 100)
    assert [eta(t) for t in (0, 1, 99)] == [0.1, 0.1, 0.1]
    assert eta(100) == pytest.approx(0.05, rel=1e-15) and eta(199) == eta(100)
    assert eta(200) == pytest.approx(0.025, rel=1e-15)
    assert eta(1050) == pytest.approx(0.1 * 0.5 ** 10, rel=1e-14)
    assert StepLR(0.3, 1.0, 7)(12345) == 0.3  # rate 1: constant


@given(st.integers(0, 10 ** 5), st.integers(1, 1000), st.floats(0.01, 1.0))
def test_step_decay_is_piecewise_constant_and_non_increasing(step, every, rate):
    eta = StepLR(ETA_MAX, rate, every)
    assert 0 <= eta(step + 1) <= eta(step) <= ETA_MAX  # 0 only by underflow
    start = step - step % every
    assert eta(step) == eta(start)


def test_cosine_end_points_and_midpoint():
    eta = CosineLR(ETA_MIN, ETA_MAX, 1000)
    assert eta(0) == pytest.approx(ETA_MAX, rel=1e-15)
    assert eta(1000) == pytest.approx(ETA_MIN, rel=1e-12)
    assert eta(500) == pytest.approx((ETA_MIN + ETA_MAX) / 2, rel=1e-14)
    assert eta(250) == pytest.approx(ETA_MIN + (ETA_MAX - ETA_MIN) * (1 + 2 ** -0.5) / 2,
                                     rel=1e-14)
    assert eta(5000) == eta(1000)  # stays at η_min after T
    values = [eta(t) for t in range(1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(ETA_MIN <= v <= ETA_MAX for v in values)
    # symmetric about the midpoint: η_t + η_{T-t} = η_min + η_max
    assert all(values[t] + values[1000 - t] == pytest.approx(ETA_MIN + ETA_MAX, rel=1e-13)
               for t in range(1001))


@given(st.integers(1, 5000), st.data())
def test_cosine_is_monotone_for_any_length(total, data):
    eta = CosineLR(ETA_MIN, ETA_MAX, total)
    t = data.draw(st.integers(0, total))
    assert ETA_MIN <= eta(t + 1) <= eta(t) <= ETA_MAX


def test_warmup_rises_linearly_to_eta_max_then_shifts_the_schedule():
    after = CosineLR(ETA_MIN, ETA_MAX, 100)
    eta = WarmUp(after, 10)
    warm = [eta(t) for t in range(10)]
    assert warm == pytest.approx([ETA_MAX * (t + 1) / 10 for t in range(10)], rel=1e-14)
    assert warm[-1] == pytest.approx(ETA_MAX, rel=1e-15)
    assert all(b - a == pytest.approx(ETA_MAX / 10, rel=1e-12) for a, b in zip(warm, warm[1:]))
    for t in (10, 11, 50, 60, 110, 500):
        assert eta(t) == after(t - 10)
    assert eta(10) == pytest.approx(ETA_MAX)  # the decay starts at the top
    step = WarmUp(StepLR(0.2, 0.1, 5), 4)
    assert [step(t) for t in range(4)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert step(4) == 0.2 and step(9) == pytest.approx(0.02)


def test_make_schedule_step_and_cosine():
    base = dict(eta_min=1e-4, eta_max=0.05, n_s=30, cycles=2)
    assert make_schedule(TrainConfig(schedule="step", **base)) == StepLR(0.05, 0.1, 30)
    assert make_schedule(TrainConfig(schedule="step", decay_rate=0.5, decay_every=7, **base)) \
        == StepLR(0.05, 0.5, 7)
    assert make_schedule(TrainConfig(schedule="step", warmup_steps=5, **base)) \
        == WarmUp(StepLR(0.05, 0.1, 30), 5)
    cosine = TrainConfig(schedule="cosine", **base)
    assert make_schedule(cosine) == CosineLR(1e-4, 0.05, cosine.total_steps)
    config = TrainConfig(schedule="cosine", warmup_steps=20, **base)
    eta = make_schedule(config)
    assert eta == WarmUp(CosineLR(1e-4, 0.05, config.total_steps - 20), 20)
    # the warm-up reaches η_max and the cosine ends at η_min on the last step
    assert eta(19) == pytest.approx(0.05) and eta(20) == pytest.approx(0.05)
    assert eta(config.total_steps) == pytest.approx(1e-4)
    assert make_schedule(TrainConfig(schedule="constant", warmup_steps=3, **base)) \
        == WarmUp(ConstantLR(0.05), 3)


def test_warmup_with_cyclic_schedule_is_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(schedule="cyclic", warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(schedule="cosine", warmup_steps=2 * 2 * N_S)  # not fewer than the steps


def test_per_member_schedules_give_a_vector_of_rates():
    schedules = (CyclicLR(ETA_MIN, ETA_MAX, 10), ConstantLR(0.3), CosineLR(0.0, 0.2, 40))
    eta = PerMember(schedules)
    for step in (0, 5, 10, 17, 40):
        np.testing.assert_array_equal(eta(step), [s(step) for s in schedules])
    assert eta.select([2, 0]) == PerMember((schedules[2], schedules[0]))


def test_make_schedule_refuses_an_unknown_schedule():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"^schedule must be one of .*, got 'linear'$"):
        make_schedule(SimpleNamespace(schedule="linear", warmup_steps=0))
