"""A validation's engine time: the server's step clock over the run against the simulated replica's busy time on
the same trace."""
from __future__ import annotations

import numpy as np
import pytest

from pernode.jobs.validate.engine_busy import describe_engine_busy, engine_busy
from pernode.price.replica import ReplicaConfig
from pernode.price.simulator import simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace


def _one_request_sim():
    # 100 prompt tokens at 1000 tokens/s in one step, then 3 decode steps of 10 ms: 4 steps, 0.13 s busy
    model = StepTimeModel.from_points({1: 0.010}, {100: 1000.0})
    config = ReplicaConfig(model, max_batch=4, kv_max_tokens=4096, token_budget=512, block_size=16)
    return simulate_fleet(RequestTrace(np.array([0.0]), np.array([100]), np.array([4])), config, 1)


def test_the_simulator_counts_its_steps_and_busy_seconds():
    sim = _one_request_sim()
    assert int(sim.steps.sum()) == 4
    assert float(sim.busy_s.sum()) == pytest.approx(0.13)


def test_the_measured_step_clock_is_set_against_the_predicted_busy_time():
    before = {"ttft_sum": 0.0, "ttft_count": 0, "steps": 10, "step_wall_s": 1.0, "step_cpu_s": 0.9}
    after = {"ttft_sum": 0.2, "ttft_count": 1, "steps": 14, "step_wall_s": 1.143, "step_cpu_s": 1.02}
    busy = engine_busy(before, after, _one_request_sim())
    assert busy["measured"]["steps"] == 4
    assert busy["measured"]["wall_s"] == pytest.approx(0.143)
    assert busy["measured"]["waited_per_step_ms"] == pytest.approx((0.143 - 0.12) / 4 * 1e3)
    assert busy["predicted"] == {"busy_s": pytest.approx(0.13), "steps": 4, "wall_per_step_ms": pytest.approx(32.5)}
    assert busy["wall_over_predicted"] == pytest.approx(1.1)
    assert "1.100x" in describe_engine_busy(busy)[0]


def test_a_server_without_a_step_clock_gives_no_measurement():
    busy = engine_busy({"ttft_sum": 0.0}, {"ttft_sum": 1.0}, _one_request_sim())
    assert busy["measured"] is None and busy["wall_over_predicted"] is None
    assert describe_engine_busy(busy) == []
