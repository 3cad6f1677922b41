"""The profile's prefill points: every length timed once per pass, passes in turn, the median kept."""
from __future__ import annotations

import pytest

from pernode.measure.profile.profiler import FULL, prefill_medians_s


def test_passes_time_every_length_in_turn_and_keep_the_median():
    order = []
    readings = {64: [0.10, 0.50, 0.12], 128: [0.20, 0.22, 0.90]}  # one stall per length, in different passes

    def time_one(n):
        order.append(n)
        return readings[n][sum(1 for m in order if m == n) - 1]

    ticks = []
    out = prefill_medians_s(time_one, [64, 128], 3, lambda: ticks.append(1))
    assert order == [64, 128, 64, 128, 64, 128]  # a drift in the machine's speed falls on both lengths alike
    assert out == {64: pytest.approx(0.12), 128: pytest.approx(0.22)}  # the stalls are dropped
    assert len(ticks) == 6


def test_one_pass_is_one_reading_per_length():
    assert prefill_medians_s(lambda n: n / 1000.0, [16, 32], 1) == {16: 0.016, 32: 0.032}


def test_the_full_profile_takes_several_passes():
    assert FULL["prefill_passes"] >= 3
