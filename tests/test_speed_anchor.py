"""The speed anchor of `fleet validate`: the node's engine speed just before the run, fitted from the server's step
clock over a short stretch of the workload, and the prediction at that speed; and the whole path against a real
`pernode serve` of a tiny model on loopback."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from test_fleet_planner import SLO_LOOSE, toy_profile
from test_measure_profile import synthetic_profile

from pernode.config import EngineConfig
from pernode.jobs.validate import ValidateConfig, rescore, run_validate
from pernode.jobs.validate.compare import predicted_for_trace, simulated_trace
from pernode.jobs.validate.request_agreement import describe_agreement, request_agreement
from pernode.jobs.validate.speed_anchor import (MAX_ANCHOR_REQUESTS, MIN_ANCHOR_REQUESTS, anchor_requests,
                                                anchored_prediction, describe_anchor, engine_model_s, engine_speed,
                                                scaled_profile, trace_model)
from pernode.measure.profile.serving_path_servers import wait_ready
from pernode.price.planner import plan
from pernode.price.workload import LengthDist, Workload
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.engine.step_clock import StepClock
from pernode import SamplingParams
from pernode.serve.deploy import free_port

WORKLOAD = Workload(4.0, LengthDist.uniform(32, 128), LengthDist.fixed(24))
ANCHOR = 12  # requests in the real-server test's anchor


def _trace(n: int, seed: int) -> dict:
    w = WORKLOAD.generate(n, seed)
    return {"offsets_s": [float(t) for t in w.arrival_s], "prompt_tokens": [int(x) for x in w.prompt_tokens],
            "output_tokens": [int(x) for x in w.output_tokens]}


def test_anchor_size_follows_the_rate_within_bounds():
    assert anchor_requests(4.0, 20.0) == 80
    assert anchor_requests(0.1, 20.0) == MIN_ANCHOR_REQUESTS
    assert anchor_requests(100.0, 20.0) == MAX_ANCHOR_REQUESTS
    assert anchor_requests(4.0, 0.0) == 0
    with pytest.raises(ValueError, match="anchor_s=-1"):
        ValidateConfig(plan_path="p.json", anchor_s=-1)


def test_a_steps_engine_time_is_its_decode_step_and_its_chunks_at_their_prompts_rates():
    prof = toy_profile(step_s=0.05, serving_path={"request_s": 0.0, "token_s": 0.0, "idle_start_s": 0.02})
    model = trace_model(prof, _plan(prof), _trace(20, 1), 512, False)  # a flat 50 ms decode step, 10,000 prompt tok/s
    assert engine_model_s(model, [0, 0.0, 0.0, 8, [[64, 100]]]) == pytest.approx(0.05 + 64 / 10_000)
    assert engine_model_s(model, [0, 0.0, 0.0, 0, [[512, 700], [100, 100]], False]) == pytest.approx(612 / 10_000)
    assert engine_model_s(model, [0, 0.0, 0.0, 0, [[100, 100]], True]) == pytest.approx(0.01 + 0.02)  # wakes idle
    # decodes 10% slower than the model, prompts 20% faster on the CPU; the prompt step also waited 1 ms for the
    # serving threads beyond its decodes' share (none in this profile)
    steps = [[0, 0.06, 0.055, 8, []], [1, 0.055 + 0.8 * 0.0064 + 0.001, 0.055 + 0.8 * 0.0064, 8, [[64, 100]]]]
    speed = engine_speed(steps, model)
    assert speed["steps"] == 2 and speed["model_s"] == pytest.approx(0.1064)
    assert speed["cpu_ratio"] == pytest.approx((0.11 + 0.8 * 0.0064) / 0.1064)
    assert speed["wall_ratio"] == pytest.approx((0.116 + 0.8 * 0.0064) / 0.1064)
    assert speed["decode_ratio"] == pytest.approx(1.1) and speed["prefill_ratio"] == pytest.approx(0.8)
    assert speed["prefill_wall_ratio"] == pytest.approx(0.8 + 0.001 / 0.0064)
    # a serving path that takes more of a decode step than the prompt step's wall holds: never below the CPU's
    served = trace_model(toy_profile(step_s=0.05, serving_path={"request_s": 0.0, "token_s": 0.001}), _plan(prof),
                         _trace(20, 1), 512, False)
    capped = engine_speed(steps, served)
    assert capped["prefill_wall_ratio"] == pytest.approx(capped["prefill_ratio"])
    assert engine_speed([], model) is None


def _plan(prof):
    return plan(prof, WORKLOAD, SLO_LOOSE, 2.0, num_requests=400, interval_seeds=1)


def _records(profile: dict, p, trace: dict, ratio: float) -> list:
    """Step records of an engine `ratio` times slower than `profile`: per request a step holding its whole prompt
    and a decode step, each as long as the model says times `ratio`."""
    model = trace_model(profile, p, trace, 512, False)
    rows = []
    for i, prompt in enumerate(trace["prompt_tokens"]):
        for step in ([2 * i, 0.0, 0.0, 0, [[prompt, prompt]]], [2 * i + 1, 0.0, 0.0, 1 + i % 7, []]):
            step[2] = ratio * engine_model_s(model, step)
            rows.append(step)
    return rows


def test_a_node_that_runs_slower_than_its_profile_is_found_and_predicted_at_that_speed():
    prof = toy_profile(step_s=0.02)
    p = _plan(prof)
    anchor_trace, run_trace = _trace(40, seed=7), _trace(120, seed=3)
    slow = scaled_profile(prof, 1.25)  # the node as it really is during the validation
    anchor = {"trace": anchor_trace, "steps": _records(prof, p, anchor_trace, 1.25)}
    measured = predicted_for_trace(slow, p, run_trace["offsets_s"], run_trace["prompt_tokens"],
                                   run_trace["output_tokens"], 512)
    real = simulated_trace(slow, p, run_trace["offsets_s"], run_trace["prompt_tokens"], run_trace["output_tokens"], 512)
    requests = {m: [float(x) for x in getattr(real, m)] for m in ("ttft_s", "tpot_s", "e2e_s")}
    out = anchored_prediction(anchor, _records(prof, p, run_trace, 1.1), prof, p, run_trace, measured, 512,
                              requests=requests)
    assert out["speed_anchor"]["engine_speed"]["cpu_ratio"] == pytest.approx(1.25)
    assert out["engine_speed_run"]["cpu_ratio"] == pytest.approx(1.1)
    assert out["predicted_anchored"] == pytest.approx(measured)  # predicted at the speed the anchor measured
    assert all(abs(e) < 1e-9 for e in out["error_pct_anchored"].values() if e is not None)
    at_run = predicted_for_trace(scaled_profile(prof, 1.1), p, run_trace["offsets_s"], run_trace["prompt_tokens"],
                                 run_trace["output_tokens"], 512)
    assert out["predicted_at_run_speed"] == pytest.approx(at_run)  # the node's drift during the run taken out
    # the records carry no wall times or gaps, so the run is one window, at the run's own speed
    assert out["engine_speed_run_windows"]["decode_ratio"] == pytest.approx((1.1,))
    assert out["predicted_at_run_speed_by_window"] == pytest.approx(at_run)
    assert out["error_pct_at_run_speed"]["tpot_p50_ms"] > 0  # the run measured slower than 1.1x
    # request by request: each request's twin at the anchor's speed is the request itself; at 1.1x each is faster
    exact, fast = out["request_agreement_anchored"], out["request_agreement_at_run_speed"]
    assert exact["ttft_s"]["requests"] == exact["e2e_s"]["requests"] == 120
    assert all(abs(exact[m][k]) < 1e-6 for m in ("ttft_s", "tpot_s", "e2e_s") for k in ("median_ms", "p10_ms",
                                                                                      "p90_ms", "median_abs_pct"))
    assert fast["tpot_s"]["p10_ms"] > 0 and 0 < fast["tpot_s"]["median_abs_pct"] < 100 * (1 - 1.1 / 1.25) + 1e-6
    assert fast["e2e_s"]["median_ms"] > 0
    assert request_agreement(real, {**requests, "tpot_s": requests["tpot_s"][:-1]}) is None  # not the same run
    assert "at the run's engine speed, measured minus simulated: TTFT +" in describe_agreement(fast, "at the "
                                                                                                 "run's engine speed")[0]
    plain = predicted_for_trace(prof, p, run_trace["offsets_s"], run_trace["prompt_tokens"],
                                run_trace["output_tokens"], 512)
    assert measured["tpot_p50_ms"] > 1.2 * plain["tpot_p50_ms"]
    anchor_line, run_line = describe_anchor(out)
    assert "25.0% slower than its profile" in anchor_line and "decode steps by 1.250 and prefill by 1.250" in anchor_line
    assert "1.100x" in run_line and "10.0% slower" in run_line


def test_no_step_records_no_anchored_prediction():
    prof = toy_profile()
    p = _plan(prof)
    out = anchored_prediction({"trace": _trace(12, 1), "steps": None}, None, prof, p, _trace(20, 2), {}, 512)
    assert out["predicted_anchored"] is None and out["speed_anchor"]["engine_speed"] is None
    assert out["predicted_at_run_speed"] is None and out["engine_speed_run"] is None
    assert describe_anchor(out) == []


def test_the_step_clock_keeps_each_steps_shape(tmp_path):
    from tiny_model import write_tiny_model

    engine = LLMEngine(model=write_tiny_model(str(tmp_path / "tiny")), num_blocks=256, max_model_len=512,
                       max_num_batched_tokens=16)
    clock = StepClock(keep=8)
    engine.add_request("a", list(range(5, 45)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    while engine.has_unfinished_requests():
        clock.run(engine.step, engine.last_step_shape)
    steps = clock.records_from(0)
    assert clock.reading()[0] == 14 and len(steps) == 8  # 3 chunks of the 40-token prompt, 11 decodes; 8 kept
    assert [s.index for s in steps] == list(range(6, 14)) and all(s.decodes == 1 and not s.chunks for s in steps)
    assert clock.records_from(12) == steps[-2:]
    clock = StepClock()
    engine.add_request("b", list(range(100, 140)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        clock.run(engine.step, engine.last_step_shape)
    assert [(s.decodes, s.chunks) for s in clock.records_from(0)] == [
        (0, ((16, 40),)), (0, ((16, 40),)), (0, ((8, 40),)), (1, ())]
    assert all(s.wall_s >= s.cpu_s * 0.5 > 0 for s in clock.records_from(0))
    first, *rest = clock.records_from(0)
    assert first.gap_s == 0.0 and all(s.gap_s > 0 and not s.from_idle for s in rest)


def test_validate_against_a_real_server_records_the_anchor_and_rescore_refits_it(tmp_path, capsys, monkeypatch):
    from tiny_model import write_tiny_model
    from pernode.jobs.validate import speed_anchor

    monkeypatch.setattr(speed_anchor, "MIN_ANCHOR_REQUESTS", ANCHOR)  # a short anchor: the floor is tested above

    folder = write_tiny_model(str(tmp_path / "tiny"))
    prof = synthetic_profile()  # a whole profile, as `pernode profile` writes it
    p = plan(prof, Workload(4.0, LengthDist.uniform(16, 32), LengthDist.fixed(6)), SLO_LOOSE, 2.0,
             num_requests=200, interval_seeds=1)
    p = dataclasses.replace(p, replicas=1)
    plan_path, profile_path = str(tmp_path / "plan.json"), str(tmp_path / "profile.json")
    p.save(plan_path)
    with open(profile_path, "w") as f:
        json.dump(prof, f)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pernode.cli", "serve", "--model", folder, "--num-threads", "1",
                             "--host", "127.0.0.1", "--port", str(port), "--num-blocks", "400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=120)
        config = ValidateConfig(plan_path=plan_path, profile_path=profile_path, base_url=f"http://127.0.0.1:{port}",
                                num_prompts=16, interval_seeds=1, anchor_s=1.0, out=str(tmp_path / "v.json"))
        assert run_validate(config, EngineConfig(model=folder, device="cpu")) == 0
    finally:
        proc.terminate()
        proc.wait(30)
    report = json.loads((tmp_path / "v.json").read_text())
    anchor = report["speed_anchor"]
    assert anchor["requests"] == ANCHOR and anchor["failed_requests"] == 0
    assert len(anchor["trace"]["offsets_s"]) == ANCHOR
    # every anchor request prefilled (in one chunk: 16-32 tokens) and decoded 5 times
    assert sum(len(s[4]) for s in anchor["steps"]) == ANCHOR
    assert sum(s[3] for s in anchor["steps"]) == 5 * ANCHOR
    assert sum(s[3] for s in report["run_steps"]) == 5 * 16
    assert anchor["steps"][0][5] and not anchor["steps"][1][5]  # the anchor's first step woke an idle engine
    speed = anchor["engine_speed"]
    assert speed["steps"] == len(anchor["steps"]) and speed["cpu_s"] > 0 and speed["model_s"] > 0
    assert report["engine_speed_run"]["steps"] == len(report["run_steps"])
    assert set(report["predicted_anchored"]) == set(report["predicted_same_trace"])
    assert len(report["measured_requests"]["ttft_s"]) == 16 and all(t > 0 for t in report["measured_requests"]["ttft_s"])
    assert report["request_agreement_same_trace"]["ttft_s"]["requests"] == 16
    assert report["request_agreement_at_run_speed"]["e2e_s"]["requests"] == 16
    printed = capsys.readouterr().out
    assert f"speed anchor ({ANCHOR} requests" in printed and "against the targets (" in printed
    again = rescore(str(tmp_path / "v.json"), profile_path)
    assert again["speed_anchor"]["engine_speed"] == pytest.approx(speed)
    assert again["predicted_anchored"] == pytest.approx(report["predicted_anchored"])
    assert again["predicted_at_run_speed"] == pytest.approx(report["predicted_at_run_speed"])
    assert again["predicted_at_run_speed_by_window"] == pytest.approx(report["predicted_at_run_speed_by_window"])
    windows = report["engine_speed_run_windows"]
    assert len(windows["start_s"]) == len(windows["decode_ratio"]) >= 1 and windows["start_s"][0] == 0.0
    for metric, agreement in report["request_agreement_at_run_speed"].items():
        assert again["request_agreement_at_run_speed"][metric] == pytest.approx(agreement)
