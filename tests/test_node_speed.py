"""The simulator at a node speed that changes over time (price/node_speed.py): a constant speed is the profile scaled,
a slow window slows only the steps that start in it, and a run of identical decode steps ends where the speed
changes; and the validation's reading of that speed, window by window, from the engine's step records."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_fleet_planner import toy_profile

from pernode.jobs.validate.speed_anchor import MIN_WINDOW_STEPS, scaled_profile, speed_by_window, step_start_times
from pernode.price.node_speed import NodeSpeed
from pernode.price.replica import ReplicaConfig
from pernode.price.simulator import simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace

FLAT = StepTimeModel.from_points({1: 0.05, 8: 0.05}, {64: 10_000.0, 512: 10_000.0})  # 50 ms decodes, 10k prompt tok/s


def _one_replica(speed: NodeSpeed | None, model: StepTimeModel = FLAT) -> ReplicaConfig:
    return ReplicaConfig(model, max_batch=16, kv_max_tokens=16384, token_budget=512, node_speed=speed)


def test_a_speed_names_its_field_and_its_windows():
    with pytest.raises(ValueError, match="one entry per window"):
        NodeSpeed((0.0, 1.0), (1.0,), (1.0, 1.0))
    with pytest.raises(ValueError, match="increase strictly"):
        NodeSpeed((0.0, 0.0), (1.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"NodeSpeed.prefill=0.0"):
        NodeSpeed((0.0,), (1.0,), (0.0,))
    speed = NodeSpeed((0.0, 10.0, 20.0), (1.0, 2.0, 1.5), (0.9, 1.1, 1.2))
    assert speed.at(-1.0) == (1.0, 0.9) and speed.at(9.99) == (1.0, 0.9) and speed.at(10.0) == (2.0, 1.1)
    assert speed.at(1e9) == (1.5, 1.2)
    assert speed.next_change_s(3.0) == 10.0 and speed.next_change_s(10.0) == 20.0
    assert math.isinf(speed.next_change_s(25.0))


def test_a_constant_speed_is_the_profile_scaled():
    prof = toy_profile(step_s=0.02)
    rng = np.random.default_rng(0)
    n = 150
    trace = RequestTrace(np.cumsum(rng.exponential(0.15, n)), rng.integers(32, 400, n), rng.integers(8, 40, n))
    base = StepTimeModel.from_profile(prof, context_tokens=200.0)
    scaled = StepTimeModel.from_profile(scaled_profile(prof, 1.3, 0.7), context_tokens=200.0)
    at_speed = simulate_fleet(trace, _one_replica(NodeSpeed.constant(1.3, 0.7), base), 1)
    reference = simulate_fleet(trace, _one_replica(None, scaled), 1)
    assert at_speed.first_token_s == pytest.approx(reference.first_token_s, rel=1e-9)
    assert at_speed.finish_s == pytest.approx(reference.finish_s, rel=1e-9)
    unscaled = simulate_fleet(trace, _one_replica(None, base), 1)
    assert np.median(unscaled.tpot_s) < np.median(at_speed.tpot_s)


def test_a_slow_window_slows_only_the_steps_that_start_in_it():
    # three requests alone on the replica: 64-token prompts (6.4 ms), then 39 decode steps each
    trace = RequestTrace(np.array([0.0, 9.5, 25.0]), np.array([64, 64, 64]), np.array([40, 40, 40]))
    speed = NodeSpeed((0.0, 10.0, 20.0), (1.0, 2.0, 1.0), (1.0, 1.0, 1.0))
    got = simulate_fleet(trace, _one_replica(speed), 1)
    plain = simulate_fleet(trace, _one_replica(None), 1)
    assert got.finish_s[0] == pytest.approx(plain.finish_s[0]) == pytest.approx(0.0064 + 39 * 0.05)
    assert got.finish_s[2] == pytest.approx(plain.finish_s[2])
    # the second request's decodes: ten start before 10 s at 50 ms, the other 29 at 100 ms; its run was cut there
    assert got.first_token_s[1] == pytest.approx(9.5064)
    assert got.finish_s[1] == pytest.approx(9.5064 + 10 * 0.05 + 29 * 0.1)
    prompt_slow = NodeSpeed((0.0, 20.0), (1.0, 1.0), (1.0, 3.0))
    late = simulate_fleet(trace, _one_replica(prompt_slow), 1)
    assert late.first_token_s[2] == pytest.approx(25.0 + 3 * 0.0064)  # its prompt step at 3x
    assert late.finish_s[2] - late.first_token_s[2] == pytest.approx(39 * 0.05)  # its decodes as profiled


def _record(i: int, wall: float, cpu: float, decodes: int, chunks: list, gap: float) -> list:
    return [i, wall, cpu, decodes, chunks, False, gap]


def test_the_runs_speed_is_read_window_by_window_from_its_step_records():
    model = StepTimeModel.from_profile(toy_profile(step_s=0.05))
    # a step every 100 ms: 100 decode steps at the model's speed, then 150 at 1.5x; 5 prompt steps in all (too few
    # for a window of their own), each at 0.8x the model on the CPU and 1 ms more on the wall
    steps = []
    for i in range(250):
        ratio = 1.0 if i < 100 else 1.5
        chunks = [[64, 64]] if i % 50 == 25 else []
        cpu = ratio * 0.05 + (0.8 * 64 / 10_000 if chunks else 0.0)
        wall = cpu + (0.001 if chunks else 0.0)
        steps.append(_record(i, wall, cpu, 4, chunks, 0.0 if i == 0 else 0.1 - steps[-1][1]))
    starts = step_start_times(steps, 2.0)
    assert starts[0] == 2.0 and starts[1] == pytest.approx(2.1) and starts[-1] == pytest.approx(2.0 + 24.9)
    speed = speed_by_window(steps, model, 2.0, window_s=10.0)
    assert speed.start_s == pytest.approx((0.0, 12.0, 22.0))
    assert speed.decode == pytest.approx((1.0, 1.5, 1.5))
    assert sum(1 for s in steps if s[4]) < MIN_WINDOW_STEPS
    # the prompts' ratio in every window is the whole run's, on the wall: 0.8 on the CPU, and 1 ms of 6.4 beside it
    assert speed.prefill == pytest.approx((0.8 + 0.001 / 0.0064,) * 3, rel=1e-6)
    assert speed_by_window([], model, 0.0) is None
