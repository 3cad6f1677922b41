"""Mixed steps (decodes and a prompt chunk in one forward pass): measured by the engine's own runner, read by the
step-time model as a correction of its additive estimate, applied by the simulator, and `fleet rescore`."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pernode.config import EngineConfig
from pernode.jobs.validate import rescore
from pernode.measure.profile.profile_schema import validate_profile
from pernode.measure.profile.profiler import mixed_grid
from pernode.measure.profile.projection import project_profile
from pernode.price.planner import plan
from pernode.price.simulator import ReplicaConfig, simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import LengthDist, RequestTrace, Workload
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.slo import SLO
from test_fleet_planner import toy_profile
from test_measure_profile import synthetic_profile
from tiny_model import write_tiny_model

STEP = 0.05  # toy_profile: flat 50 ms decode step, prefill at 10,000 tokens/s


def mixed(points):
    return [{"batch_size": b, "context_len": 512, "prompt_tokens": p, "step_s": s} for b, p, s in points]


def test_mixed_points_scale_the_additive_estimate_exactly_where_measured_and_hold_at_the_edges():
    # additive at (8, 100): 0.05 + 0.01 = 0.06; measured 0.03 -> factor 0.5; at (8, 400): 0.09 vs 0.09 -> 1.0
    prof = toy_profile(mixed=mixed([(8, 100, 0.03), (8, 400, 0.09), (32, 100, 0.06), (32, 400, 0.045)]))
    m = StepTimeModel.from_profile(prof, mixed_steps=True)
    assert m.step_s(8, 100) == pytest.approx(0.03)
    assert m.step_s(8, 400) == pytest.approx(0.09)
    assert m.step_s(32, 400) == pytest.approx(0.045)
    assert m.mix_factor(8, 200) == pytest.approx(0.75)  # halfway in log p between 100 and 400
    assert m.mix_factor(2, 50) == pytest.approx(0.5)  # held at the measured corner
    assert m.step_s(8, 0) == pytest.approx(STEP) and m.mix_factor(0, 100) == 1.0  # pure steps stay measured
    for plain in (StepTimeModel.from_profile(toy_profile()), StepTimeModel.from_profile(prof)):  # additive default
        assert plain.mix_factor(8, 100) == 1.0 and plain.step_s(8, 100) == pytest.approx(0.06)


def test_a_missing_cell_takes_its_rows_mean_and_bad_points_name_the_field():
    m = StepTimeModel.from_profile(toy_profile(mixed=mixed([(8, 100, 0.03), (32, 100, 0.06), (32, 400, 0.09)])),
                                   mixed_steps=True)
    assert m.mix_factor(8, 400) == pytest.approx(0.5)
    good = synthetic_profile()
    good["mixed"] = mixed([(8, 100, 0.2)])
    validate_profile(good)
    good["mixed"][0]["step_s"] = -1.0
    with pytest.raises(ValueError, match=r"profile.mixed\[0\].step_s"):
        validate_profile(good)


def test_the_simulator_steps_mixed_batches_at_the_corrected_time():
    # 4 requests arrive together, then one more while they decode: its prefill rides with their decodes.
    trace = RequestTrace(np.array([0.0, 0.0, 0.0, 0.0, 0.2]), np.array([64] * 5), np.array([40] * 5))
    finish = {}
    for name, prof in (("additive", toy_profile()),
                       ("halved", toy_profile(mixed=mixed([(4, 64, 0.5 * (STEP + 64 / 10_000))])))):
        cfg = ReplicaConfig(StepTimeModel.from_profile(prof, mixed_steps=True), max_batch=8, kv_max_tokens=3200,
                            token_budget=512)
        res = simulate_fleet(trace, cfg, 1)
        finish[name] = float(np.max(res.finish_s))
    assert finish["halved"] < finish["additive"]


def test_projection_drops_the_cpu_mixed_points():
    prof = synthetic_profile()
    prof["mixed"] = mixed([(8, 100, 0.2)])
    assert "mixed" not in project_profile(validate_profile(prof), "H100 SXM")


def test_mixed_grid_stays_within_the_token_budget():
    grid = mixed_grid([1, 2, 4, 8, 16, 32, 64], [16, 64, 128, 256, 512], 512)
    assert grid == [(4, 64), (4, 256), (16, 64), (16, 256), (64, 64), (64, 256)]
    assert all(b + p <= 100 for b, p in mixed_grid([4, 64], [64, 256], 100))


def test_the_engine_times_mixed_steps_and_gives_every_block_back(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    engine = LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="float32", num_blocks=64,
                                    enable_prefix_caching=False))
    free = engine.kv.pool.num_free
    times = engine.time_mixed_steps(4, 20, 48, 3)
    assert times is not None and len(times) == 3 and all(t > 0 for t in times)
    assert engine.kv.pool.num_free == free
    assert engine.time_mixed_steps(64, 200, 48, 3) is None  # does not fit: no partial allocation left behind
    assert engine.kv.pool.num_free == free


def test_rescore_predicts_a_recorded_run_again_from_another_profile(tmp_path):
    wl = Workload(2.0, LengthDist.fixed(100), LengthDist.fixed(20))
    p = plan(toy_profile(), wl, SLO(ttft_s=2.0, tpot_s=0.1), 2.0, num_requests=200, interval_seeds=1, replicas=1)
    p.save(tmp_path / "plan.json")
    n = 40
    offsets = (np.arange(n) * 0.5).tolist()
    measured = {"goodput_rps": 1.9, "attainment": 1.0, "ttft_p50_ms": 80.0, "ttft_p99_ms": 150.0,
                "tpot_p50_ms": 50.0, "tpot_p99_ms": 60.0, "e2e_p50_ms": 1100.0, "e2e_p99_ms": 1300.0}
    report = {"plan": str(tmp_path / "plan.json"), "measured": measured, "token_budget": 512,
              "workload": {"rate_rps": 2.0, "input_len": "100", "output_len": "20", "burstiness": 1.0, "seed": 0},
              "same_trace_requests": {"offsets_s": offsets, "prompt_tokens": [100] * n, "output_tokens": [20] * n}}
    (tmp_path / "v.json").write_text(json.dumps(report))
    fast = synthetic_profile()
    slow = copy.deepcopy(fast)
    for d in slow["decode"]:
        d["step_s"] *= 2
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    fast_r = rescore(str(tmp_path / "v.json"), str(tmp_path / "fast.json"), interval_seeds=1)
    slow_r = rescore(str(tmp_path / "v.json"), str(tmp_path / "slow.json"), interval_seeds=1)
    f, sl = fast_r["predicted_same_trace"]["tpot_p50_ms"], slow_r["predicted_same_trace"]["tpot_p50_ms"]
    assert sl == pytest.approx(2 * f, rel=0.15)
    assert slow_r["error_pct_same_trace"]["tpot_p50_ms"] == pytest.approx((50.0 - sl) / sl * 100)
    assert slow_r["measured"] == measured and slow_r["rescored_from"].endswith("v.json")
    # The serving path the run's idle probe measured through the fleet: +80 ms a request, +5 ms a token.
    report["idle_probe"] = {"added_ms": {"ttft_p50": 80.0, "tpot_p50": 5.0}}
    (tmp_path / "v.json").write_text(json.dumps(report))
    probed = rescore(str(tmp_path / "v.json"), str(tmp_path / "fast.json"), interval_seeds=1,
                     serving_path_from_probe=True)
    same, base = probed["predicted_same_trace"], fast_r["predicted_same_trace"]
    # +80 ms before the engine, plus the longer steps (5 ms a running request) it then queues behind
    assert base["ttft_p50_ms"] + 80.0 <= same["ttft_p50_ms"] <= base["ttft_p50_ms"] + 130.0
    assert same["tpot_p50_ms"] > base["tpot_p50_ms"] + 4.0
    assert probed["serving_path_from_probe"]["request_s"] == pytest.approx(0.080)
    del report["same_trace_requests"]
    (tmp_path / "old.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="same_trace_requests"):
        rescore(str(tmp_path / "old.json"), str(tmp_path / "fast.json"))
