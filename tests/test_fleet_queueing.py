"""Closed-form queueing (Kleinrock 1975) and the FIFO simulator held to it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pernode.price.queueing import (erlang_c, littles_law_mean_in_system, littles_law_mean_time_s, mm1_mean_sojourn_s,
                                    mm1_mean_wait_s, mmc_mean_wait_s, mmc_wait_quantile_s, mmc_wait_tail,
                                    replica_capacity_rps, request_service_s, time_average_in_system)
from pernode.price.simulator import simulate_fifo_servers
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import LengthDist, Workload


def erlang_c_textbook(c: int, a: float) -> float:
    """Erlang C straight from its definition, a^c/c! * c/(c-a) over sum_{k<c} a^k/k! + that (small c only)."""
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def mmc_trace(rate: float, mu: float, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1 / rate, n)), rng.exponential(1 / mu, n)


def test_erlang_c_known_values():
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2, rho 1/2: 2 rho^2 / (1 + rho)
    for c, a in [(3, 2.5), (10, 8.0), (25, 20.0)]:
        assert erlang_c(c, a) == pytest.approx(erlang_c_textbook(c, a), rel=1e-12)
    assert erlang_c(5, 0.0) == 0.0
    assert erlang_c(5, 5.0) == 1.0


def test_erlang_c_large_fleets_stay_finite():
    c = erlang_c(4000, 3900.0)  # a^c / c! overflows a float many times over; the recursion does not
    assert 0.0 < c < 1.0


def test_mm1_is_mmc_with_one_server():
    assert mm1_mean_wait_s(3.0, 4.0) == pytest.approx(0.75 / (4.0 - 3.0))  # rho / (mu - lambda)
    assert mm1_mean_sojourn_s(3.0, 4.0) == pytest.approx(1 / (4.0 - 3.0))
    assert mmc_wait_tail(0.5, 3.0, 4.0, 1) == pytest.approx(0.75 * math.exp(-0.5))


def test_wait_quantile_inverts_the_tail():
    for c, rate, mu in [(1, 0.8, 1.0), (4, 3.5, 1.0), (16, 12.0, 1.0)]:
        t = mmc_wait_quantile_s(0.99, rate, mu, c)
        assert float(mmc_wait_tail(t, rate, mu, c)) == pytest.approx(0.01, rel=1e-9)
    assert mmc_wait_quantile_s(0.5, 1.0, 1.0, 8) == 0.0  # most arrivals never wait


def test_littles_law_helpers():
    assert littles_law_mean_in_system(4.0, 2.5) == 10.0
    assert littles_law_mean_time_s(10.0, 4.0) == 2.5


# Run lengths chosen so that the tolerance is > 5 standard deviations of the estimate (checked over 30 seeds).
def test_fifo_simulation_matches_mm1():
    rate, mu = 0.5, 1.0  # rho 0.5; W_q = 1.0 s
    a, s = mmc_trace(rate, mu, 400_000, 11)
    res = simulate_fifo_servers(a, s, 1)
    assert res.wait_s.mean() == pytest.approx(mm1_mean_wait_s(rate, mu), rel=0.04)
    assert res.sojourn_s.mean() == pytest.approx(mm1_mean_sojourn_s(rate, mu), rel=0.03)


def test_fifo_simulation_matches_mmc_mean_and_tail():
    rate, mu, c = 3.2, 1.0, 4  # rho 0.8
    a, s = mmc_trace(rate, mu, 1_000_000, 21)
    res = simulate_fifo_servers(a, s, c)
    assert res.wait_s.mean() == pytest.approx(mmc_mean_wait_s(rate, mu, c), rel=0.05)
    assert np.mean(res.wait_s > 0) == pytest.approx(erlang_c(c, rate / mu), rel=0.03)
    for t in (0.5, 2.0):
        assert np.mean(res.wait_s > t) == pytest.approx(float(mmc_wait_tail(t, rate, mu, c)), rel=0.06)


def test_littles_law_on_fifo_trace():
    rate, mu, c = 2.0, 1.0, 3
    a, s = mmc_trace(rate, mu, 100_000, 5)
    res = simulate_fifo_servers(a, s, c)
    l_measured = time_average_in_system(a, res.finish_s)
    # Exact over the window (the system starts and ends empty) with the window's own arrival rate...
    lam_window = a.size / (res.finish_s.max() - a.min())
    assert l_measured == pytest.approx(lam_window * res.sojourn_s.mean(), rel=1e-9)
    # ...and close with the nominal rate over a long run: L = lambda W = 2 * (W_q + 1).
    assert l_measured == pytest.approx(rate * (mmc_mean_wait_s(rate, mu, c) + 1 / mu), rel=0.04)


def test_replica_capacity_by_hand():
    # Constant 50 ms decode step, 10,000 prompt tokens/s, 100 in / 100 out, batch 16:
    # a slot is held 100 * 0.05 + 16 * 100 / 10000 = 5.16 s, so capacity = 16 / 5.16 req/s.
    step = StepTimeModel.from_points({1: 0.05, 32: 0.05}, {64: 10_000.0, 512: 10_000.0})
    wl = Workload(1.0, LengthDist.fixed(100), LengthDist.fixed(100))
    assert request_service_s(step, 16, wl) == pytest.approx(5.16)
    assert replica_capacity_rps(step, 16, wl) == pytest.approx(16 / 5.16)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="unstable"):
        mmc_mean_wait_s(4.0, 1.0, 4)
    with pytest.raises(ValueError, match="num_servers"):
        mmc_mean_wait_s(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="rate_rps"):
        mmc_mean_wait_s(-1.0, 1.0, 2)
    with pytest.raises(ValueError, match="quantile"):
        mmc_wait_quantile_s(1.0, 1.0, 2.0, 1)
    with pytest.raises(ValueError, match="sorted"):
        simulate_fifo_servers(np.array([1.0, 0.5]), np.array([1.0, 1.0]), 1)
