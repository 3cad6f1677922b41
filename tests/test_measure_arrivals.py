"""Gamma arrivals: the mean rate is the requested rate for any burstiness; inf sends at once; seeds reproduce."""
import math

import numpy as np
import pytest

from pernode.measure.bench.arrivals import arrival_gaps_s, arrival_offsets_s


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 2.0])
def test_mean_rate_matches(burstiness):
    rate = 8.0
    gaps = np.array(arrival_gaps_s(50_000, rate, burstiness, seed=1))
    # 50k gaps: the mean's relative std is sqrt(1/burstiness)/sqrt(50k) <= 0.7%, so 3% is a wide margin.
    assert 1.0 / gaps.mean() == pytest.approx(rate, rel=0.03)
    # Gamma(shape=k): coefficient of variation 1/sqrt(k); burstiness < 1 is burstier than Poisson.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_offsets_rate():
    offsets = arrival_offsets_s(20_001, 5.0, 1.0, seed=3)
    assert offsets[0] == 0.0
    assert np.all(np.diff(offsets) >= 0)
    assert 20_000 / offsets[-1] == pytest.approx(5.0, rel=0.03)


def test_inf_rate_sends_all_at_once():
    assert arrival_gaps_s(5, math.inf) == [0.0] * 5
    assert arrival_offsets_s(4, float("inf"), burstiness=0.3) == [0.0] * 4


def test_seeded_reproducible():
    assert arrival_gaps_s(100, 3.0, 0.5, seed=7) == arrival_gaps_s(100, 3.0, 0.5, seed=7)
    assert arrival_gaps_s(100, 3.0, 0.5, seed=7) != arrival_gaps_s(100, 3.0, 0.5, seed=8)


def test_bad_inputs_name_the_setting():
    with pytest.raises(ValueError, match="request_rate=0.0"):
        arrival_gaps_s(3, 0.0)
    with pytest.raises(ValueError, match="burstiness=-1.0"):
        arrival_gaps_s(3, 1.0, -1.0)
    with pytest.raises(ValueError, match="num_requests"):
        arrival_gaps_s(-1, 1.0)
