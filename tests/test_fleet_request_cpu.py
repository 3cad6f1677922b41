"""The serving path's per-request work on the engine's core: added to the step each request is admitted in."""
from __future__ import annotations

import numpy as np
import pytest

from pernode.price.replica import ReplicaConfig
from pernode.price.simulator import simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace


def _profile(request_cpu_s=None) -> dict:
    profile = {"decode": [{"batch_size": 1, "step_s": 0.010}],
               "prefill": [{"prompt_len": 100, "prefill_tokens_per_s": 1000.0}],
               "serving_path": {"request_s": 0.0, "token_s": 0.0}}
    if request_cpu_s is not None:
        profile["serving_path"]["request_cpu_s"] = request_cpu_s
    return profile


def _busy_s(profile: dict) -> tuple[float, np.ndarray]:
    config = ReplicaConfig(StepTimeModel.from_profile(profile), max_batch=4, kv_max_tokens=4096, token_budget=512,
                           block_size=16)
    # three 100-token prompts at t=0, 2 output tokens each: the first starts a step on the idle replica alone, the
    # other two are admitted together in the next
    sim = simulate_fleet(RequestTrace(np.zeros(3), np.full(3, 100), np.full(3, 2)), config, 1)
    return float(sim.busy_s.sum()), sim.first_token_s


def test_each_admitted_request_adds_its_serving_work_to_the_step_it_is_admitted_in():
    base, first_base = _busy_s(_profile())
    with_work, first = _busy_s(_profile(0.005))
    assert base >= 0.300  # the three prompts' prefill at least
    assert with_work == pytest.approx(base + 3 * 0.005)
    # the first request's step pays its own work; the next step pays for the two it admits, after the first's
    assert first == pytest.approx(first_base + np.array([0.005, 0.015, 0.015]))


def test_a_bad_request_cpu_names_the_field():
    with pytest.raises(ValueError, match=r"serving_path.request_cpu_s=-0.001"):
        StepTimeModel.from_profile(_profile(-0.001))
