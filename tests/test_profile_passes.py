"""The profile's prefill and decode points: every length or batch size timed once per pass, passes in turn, the
median kept."""
from __future__ import annotations

import pytest

from pernode.measure.profile.profiler import FULL, QUICK, decode_medians_s, prefill_medians_s


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
    assert FULL["prefill_passes"] >= 3 and FULL["decode_passes"] >= 3
    assert QUICK["decode_passes"] == 1


def test_decode_passes_time_every_batch_in_turn_and_keep_the_median():
    order = []
    slow = {1: 1, 4: 0}  # the node slows down by 30% for one reading of each batch size, in different passes

    def time_one(b):
        order.append(b)
        k = sum(1 for m in order if m == b) - 1
        return 0.01 * b * (1.3 if k == slow.get(b) else 1.0)

    ticks = []
    out = decode_medians_s(time_one, [1, 4], 3, max_step_s=5.0, after_each=lambda: ticks.append(1))
    assert order == [1, 4, 1, 4, 1, 4] and len(ticks) == 6
    assert out == {1: pytest.approx(0.01), 4: pytest.approx(0.04)}  # the slow readings are dropped


def test_decode_passes_stop_where_the_first_pass_stopped():
    order = []

    def time_one(b):
        order.append(b)
        return None if b > 8 else b * 0.1  # 16 does not fit; 8 takes 0.8 s, over the 0.5 s cap

    out = decode_medians_s(time_one, [1, 4, 8, 16, 32], 2, max_step_s=0.5)
    assert out == {1: pytest.approx(0.1), 4: pytest.approx(0.4), 8: pytest.approx(0.8)}
    assert order == [1, 4, 8, 1, 4, 8]  # the cap keeps 8 (it was measured) and stops the sweep there
    assert decode_medians_s(time_one, [16, 1], 3, max_step_s=5.0) == {}
