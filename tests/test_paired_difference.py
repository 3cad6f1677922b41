"""The paired-difference summary the serving-path measurement rests on: the median's order-statistics interval,
and the flag that says a difference is below the noise instead of clamping it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pernode.measure.profile.paired_difference import interval_coverage, median_interval_ranks, paired_difference
from pernode.measure.profile.serving_path import Timing, summarize_pairs


def test_median_interval_ranks_match_the_sign_test_table():
    # n = 12 at 95%: P(Bin(12, 1/2) <= 2) = 79/4096, two-sided 0.0386 <= 0.05; rank 4 would give 0.146.
    assert median_interval_ranks(12) == (3, 10)
    assert interval_coverage(12, 3) == pytest.approx(1 - 2 * 79 / 4096)
    assert median_interval_ranks(20) == (6, 15)  # the published table's value for n = 20
    assert median_interval_ranks(3) == (1, 3)  # too few pairs: the whole range, coverage 0.75
    assert interval_coverage(3, 1) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="n=0"):
        median_interval_ranks(0)
    with pytest.raises(ValueError, match="confidence"):
        median_interval_ranks(5, 1.5)


def test_interval_covers_the_true_median_at_its_stated_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):  # skewed noise: the median of an exponential(1) shifted by 0.01 is 0.01 + ln 2
        a = rng.exponential(1.0, 12)
        d = paired_difference(a, a + 0.01 + rng.exponential(1.0, 12))
        hits += d.interval_s[0] <= 0.01 + math.log(2) <= d.interval_s[1]
    assert abs(hits / 2000 - interval_coverage(12, 3)) < 0.02


def test_a_difference_within_the_noise_is_flagged_not_clamped():
    clear = paired_difference([1.0] * 8, [1.0 + x for x in (0.01, 0.012, 0.011, 0.013, 0.009, 0.01, 0.011, 0.012)])
    assert not clear.below_noise and clear.planned_s == pytest.approx(0.0110, abs=1e-9)
    assert "planned as 11.00 ms" in clear.describe("per request")
    noisy = paired_difference([1.0] * 8, [1.0 + x for x in (-0.02, 0.01, -0.004, 0.003, -0.01, 0.02, -0.001, 0.0)])
    assert noisy.below_noise and noisy.median_s == pytest.approx(-0.0005)
    assert noisy.planned_s == 0.0 and "BELOW THE NOISE" in noisy.describe("per token")
    d = noisy.to_dict()
    assert d["median_s"] < 0 and d["below_noise"] and d["planned_s"] == 0.0  # the raw median is kept
    biased = paired_difference([1.0] * 6, [1.0 - x for x in (0.01, 0.012, 0.011, 0.013, 0.009, 0.01)])
    assert not biased.below_noise and biased.planned_s == 0.0 and "NEGATIVE beyond the noise" in biased.describe("t")
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


def test_serving_path_section_from_pairs_carries_medians_spread_and_load():
    pairs = [(Timing(0.100 + 0.01 * i, 0.020, 8), Timing(0.130 + 0.01 * i, 0.0215, 8)) for i in range(6)]
    sp = summarize_pairs(pairs, "16:64", "8", 1.5, 2.0)
    assert sp["request_s"] == pytest.approx(0.030) and sp["token_s"] == pytest.approx(0.0015)
    assert not sp["below_noise"] and sp["pairs"] == 6 and sp["load_avg_1m"] == [1.5, 2.0]
    assert sp["direct_ttft_p50_s"] == pytest.approx(0.125) and sp["ttft_p50_s"] == pytest.approx(0.155)
    one_token = summarize_pairs([(Timing(0.1, None, 1), Timing(0.2, None, 1))], "16", "1", 0.0, 0.0)
    assert one_token["token"] is None and one_token["token_s"] == 0.0 and one_token["below_noise"]
