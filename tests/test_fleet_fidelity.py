"""What makes a plan match a real fleet: the serving path in the step model, one KV rule for planner and simulator,
seed intervals, each replica on its own cores, and plans that say what they rest on."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pernode.config import EngineConfig
from pernode.measure.profile.serving_path import measure_serving_path
from pernode.price.intervals import seed_intervals, where_in_interval
from pernode.price.planner import plan
from pernode.price.simulator import ReplicaConfig, simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.max_batch import kv_blocks_held_mean, max_batch_size
from pernode.price.workload import LengthDist, RequestTrace, Workload
from pernode.serve.deploy import Autoscale, FleetSpec
from pernode.serve.deploy.cpuset import check_cpusets, claim_slot, claims, parse_cpu_list, pin_process
from pernode.slo import SLO
from test_fleet_planner import toy_profile
from tiny_model import write_tiny_model


def test_serving_path_enters_the_step_time_and_the_arrivals():
    base = toy_profile()
    prof = toy_profile(serving_path={"request_s": 0.1, "token_s": 0.002})
    plain, served = StepTimeModel.from_profile(base), StepTimeModel.from_profile(prof)
    assert served.decode_step_s(8) == pytest.approx(plain.decode_step_s(8) + 8 * 0.002)
    assert served.decode_step_s(0) == 0.0
    # One request alone: it reaches the engine 100 ms late, its prefill is 10 ms, then 9 decode steps of 52 ms.
    trace = RequestTrace(np.array([0.0]), np.array([100]), np.array([10]))
    res = simulate_fleet(trace, ReplicaConfig(served, 4, 3200, 512, 16), 1)
    assert res.ttft_s[0] == pytest.approx(0.1 + 100 / 10_000)
    assert res.e2e_s[0] == pytest.approx(0.1 + 0.01 + 9 * 0.052)
    p = plan(prof, Workload(2.0, LengthDist.fixed(100), LengthDist.fixed(20)), SLO(ttft_s=1.0), 1.0,
             num_requests=200, interval_seeds=1)
    assert any("serving_path: 100.0 ms per request, 2.00 ms per streamed token" in line for line in p.rests_on)
    with pytest.raises(ValueError, match="serving_path.token_s"):
        StepTimeModel.from_profile(toy_profile(serving_path={"request_s": 0.1, "token_s": -1}))


def test_planner_counts_kv_as_the_engine_and_the_simulator_do():
    # A request holds ceil(tokens / block) blocks in each of its steps; the planner's batch is blocks // mean.
    assert kv_blocks_held_mean(100, 100, 16) == pytest.approx(np.mean(np.ceil(np.arange(100, 200) / 16)))
    assert kv_blocks_held_mean(16, 1, 16) == 1.0
    step = StepTimeModel.from_points({1: 0.02, 64: 0.02}, {16: 10_000.0, 4096: 10_000.0})
    mb = max_batch_size(step, 3200, 400, None, 4096, mean_prompt_tokens=200, mean_output_tokens=200, block_size=16)
    assert mb.kv_limit == int(200 // kv_blocks_held_mean(200, 200, 16)) > 3200 // 400  # the old rule: full context
    # Run at that batch on a smooth stream, the simulator's replica (the engine's KV cache) holds about that many.
    wl = Workload(1.0, LengthDist.fixed(200), LengthDist.fixed(200), burstiness=4.0)
    trace = wl.generate(300, seed=1)
    trace = RequestTrace(trace.arrival_s / 8.0, trace.prompt_tokens, trace.output_tokens)  # 8 req/s: saturating
    res = simulate_fleet(trace, ReplicaConfig(step, mb.batch_size, 3200, 4096, 16), 1)
    assert res.slot_occupancy() > 0.85


def test_seed_intervals_bracket_every_seed_and_say_where_a_value_falls():
    step = StepTimeModel.from_points({1: 0.02, 16: 0.03}, {64: 5000.0})
    wl = Workload(20.0, LengthDist.uniform(16, 128), LengthDist.uniform(8, 32))
    cfg = ReplicaConfig(step, 8, 4096, 256, 16)
    slo = SLO(ttft_s=0.5)
    iv = seed_intervals(lambda s: wl.generate(300, s), cfg, 2, "least_outstanding", slo, [0, 1, 2])
    assert iv["seeds"] == [0, 1, 2]
    for s in (0, 1, 2):
        res = simulate_fleet(wl.generate(300, s), cfg, 2)
        lo, hi = iv["ttft_p99_ms"]
        assert lo <= res.percentiles_s("ttft")["p99"] * 1000 <= hi
    lo, hi = iv["tpot_p50_ms"]
    assert where_in_interval((lo + hi) / 2, [lo, hi]) == "inside"
    assert where_in_interval(hi * 1.5, [lo, hi]) == "above" and where_in_interval(lo / 2, [lo, hi]) == "below"
    assert where_in_interval(None, [lo, hi]) is None


def test_projected_plans_print_their_assumptions():
    prof = toy_profile(kind="projected", hardware={"name": "H200"},
                       projected_from={"hardware_name": "2-core CPU", "method": "roofline ratio",
                                       "memory_utilization": 0.9, "warnings": []})
    p = plan(prof, Workload(2.0, LengthDist.fixed(100), LengthDist.fixed(20)), SLO(ttft_s=1.0), 1.0,
             num_requests=200, interval_seeds=1)
    assert p.assumptions and p.assumptions[0].startswith("PROJECTION: no H200 was measured")
    assert any(line.startswith("profile projected to H200") for line in p.rests_on)


def test_cpu_lists_parse_and_replicas_get_cores_of_their_own(tmp_path):
    assert parse_cpu_list("0,2-3") == (0, 2, 3) and parse_cpu_list("1") == (1,)
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(ValueError, match="cpuset"):
            parse_cpu_list(bad)
    cores = sorted(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="one --cpuset per replica"):
        check_cpusets((str(cores[0]),), 2)
    with pytest.raises(ValueError, match="shares cores"):
        check_cpusets((str(cores[0]), str(cores[0])), 2)
    with pytest.raises(ValueError, match="not available"):
        check_cpusets(("4095",), 1)
    # A fleet spec with cpusets: each replica's CPUs and threads default to its own core count.
    spec = FleetSpec(EngineConfig(), replicas=1, cpusets=(str(cores[0]),))
    assert spec.resources(len(cores)) == (1.0, 1)
    with pytest.raises(ValueError, match="cpusets"):
        FleetSpec(EngineConfig(), replicas=1, cpusets=("0",), autoscale=Autoscale(1, 2, 4))
    # Claims: the first free slot; a slot whose owner died is taken over.
    assert claim_slot(str(tmp_path), 2) == 0 and claim_slot(str(tmp_path), 2) == 1
    with pytest.raises(RuntimeError, match="held by a live replica"):
        claim_slot(str(tmp_path), 2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "slot-1").write_text(dead.stdout.strip())
    assert claim_slot(str(tmp_path), 2) == 1
    assert claims(str(tmp_path))[1]["pid"] == os.getpid()


def test_pinning_applies_to_every_thread_of_the_process():
    code = ("import os, threading, time\n"
            "from pernode.serve.deploy.cpuset import pin_process\n"
            "t = threading.Thread(target=time.sleep, args=(2,)); t.start()\n"
            f"pin_process(({min(os.sched_getaffinity(0))},))\n"
            "print(sorted({tuple(sorted(os.sched_getaffinity(int(x)))) for x in os.listdir('/proc/self/task')}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == f"[({min(os.sched_getaffinity(0))},)]"
    assert callable(pin_process)


def test_serving_path_measured_as_pairs_against_a_real_pernode_serve(tmp_path):
    from pernode.serve.engine.llm_engine import LLMEngine

    model = write_tiny_model(str(tmp_path / "tiny"))
    flags = ["--model", model, "--device", "cpu", "--num-threads", "1", "--num-blocks", "64", "--max-model-len", "512"]
    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_threads=1, num_blocks=64, max_model_len=512))
    sp = measure_serving_path(engine, flags, num_pairs=4, input_len="16:64", output_len="8")
    assert sp["pairs"] == sp["requests"] == 4 and len(sp["notes"]) == 2
    # The same prompts both ways: the direct half is the engine alone, so over HTTP a request takes longer.
    assert sp["ttft_p50_s"] > sp["direct_ttft_p50_s"] > 0
    req = sp["request"]
    assert req["pairs"] == 4 and req["interval_s"][0] <= req["median_s"] <= req["interval_s"][1]
    assert sp["request_s"] == max(0.0, req["median_s"]) and sp["token_s"] >= 0.0  # planned value, never hidden
    assert req["below_noise"] == (req["interval_s"][0] <= 0.0 <= req["interval_s"][1])
    assert len(sp["load_avg_1m"]) == 2 and "alternating" in sp["method"]


def test_a_fleet_of_a_given_size_is_evaluated_and_can_be_run_even_when_it_misses():
    from pernode.jobs.fleet_from_plan import fleet_spec_for_plan
    from test_fleet_planner import SLO_LOOSE, WORKLOAD

    p = plan(toy_profile(), WORKLOAD, SLO(ttft_s=0.05), 2.0, num_requests=300, interval_seeds=1, replicas=3)
    assert not p.feasible and p.replicas == 3 and "with the 3 replicas asked for" in p.reason
    assert fleet_spec_for_plan(p, EngineConfig(model="m")).replicas == 3  # validate runs what was evaluated
    with pytest.raises(ValueError, match="replicas=1: below the 3 replicas"):
        plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, num_requests=300, interval_seeds=1, replicas=1)


def test_a_plan_says_when_its_serving_path_terms_were_noise_or_negative():
    sp = {"request_s": 0.0, "token_s": 0.0,
          "request": {"median_s": -0.03, "below_noise": True}, "token": {"median_s": -0.007, "below_noise": False}}
    p = plan(toy_profile(serving_path=sp), Workload(2.0, LengthDist.fixed(100), LengthDist.fixed(50)), SLO(ttft_s=2.0, tpot_s=0.1), 2.0, num_requests=200,
             interval_seeds=1)
    line = next(x for x in p.rests_on if x.startswith("serving_path:"))
    assert "the request term below that run's noise" in line
    assert "the token term measured negative beyond the noise, taken as 0" in line
