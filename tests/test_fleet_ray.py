"""`pernode fleet` on Ray Serve: two replicas of a tiny model behind the OpenAI route, on loopback, then a clean
shutdown; and the pieces that need no Ray (autoscaling from a plan, CPU shares, the plan's workload)."""
from __future__ import annotations

import concurrent.futures
import json
import socket

import pytest

from pernode.config import EngineConfig
from pernode.serve.deploy.ray_fleet import (ROUTER_POLICY, Autoscale, FleetSpec, LocalFleet, build_application,
                                     replica_states, still_running)
from pernode.jobs.validate import errors_pct, workload_from_plan

PLAN = {"feasible": True, "replicas": 2, "policy": "least_outstanding",
        "workload": {"description": "3 req/s (Poisson), input uniform 32..128, output 48 [synthetic]",
                     "rate_rps": 3.0, "mean_input_tokens": 80.0, "mean_output_tokens": 48.0},
        "max_batch_per_replica": {"batch_size": 8}, "latency_s": {"e2e": {"p50": 2.0}}}


def test_autoscale_parse_and_from_plan():
    assert Autoscale.parse("1,4,8") == Autoscale(1, 4, 8.0)
    with pytest.raises(ValueError, match="MIN,MAX"):
        Autoscale.parse("1,4")
    with pytest.raises(ValueError, match="MIN <= MAX"):
        Autoscale.parse("3,2,8")
    # Little's law at the planned rate: 3 req/s x 2 s / 2 replicas = 3 ongoing each; floor = plan, ceiling = 2x
    assert Autoscale.from_plan(PLAN) == Autoscale(2, 4, 3.0)
    assert Autoscale.from_plan(PLAN).to_config()["initial_replicas"] == 2


def test_cpu_shares_never_oversubscribe():
    spec = FleetSpec(EngineConfig(model="x"), replicas=2)
    assert spec.resources(2.0) == (1.0, 1)
    spec = FleetSpec(EngineConfig(model="x"), replicas=4)
    assert spec.resources(2.0) == (0.5, 1)  # fractional CPUs, one thread each
    spec = FleetSpec(EngineConfig(model="x"), replicas=2, autoscale=Autoscale(1, 3, 4))
    assert spec.resources(16.0) == (5.33, 5)  # shared out for the most replicas autoscaling may start
    assert FleetSpec(EngineConfig(model="x")).resources(16.0, node_cpus=8.0) == (8.0, 8)  # fits on one node


def test_deployment_options():
    pytest.importorskip("ray.serve")
    spec = FleetSpec(EngineConfig(model="x", max_num_seqs=8), replicas=3, num_cpus_per_replica=0.5)
    app, info = build_application(spec, cluster_cpus=2.0)
    d = app._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_cpus"] == 0.5
    assert d.ray_actor_options["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert d.max_ongoing_requests == 8 + 256  # the router holds nothing back: engines queue, as the planner models
    assert info["planner_policy"] == ROUTER_POLICY == "least_outstanding"
    spec = FleetSpec(EngineConfig(model="x"), autoscale=Autoscale(1, 4, 6))
    app, _ = build_application(spec, cluster_cpus=4.0)
    cfg = app._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 6)


def test_workload_and_errors_from_plan():
    w = workload_from_plan(PLAN)
    assert w == {"rate_rps": 3.0, "input_len": "32:128", "output_len": "48", "burstiness": 1.0}
    bursty = dict(PLAN, workload=dict(PLAN["workload"], description="2 req/s (gamma burstiness 0.5), input 64, "
                                                                        "output uniform 8..16 [synthetic]"))
    assert workload_from_plan(bursty)["burstiness"] == 0.5
    assert workload_from_plan(bursty)["output_len"] == "8:16"
    trace = dict(PLAN, workload=dict(PLAN["workload"], description="2 req/s (Poisson), input empirical n=9, mean 5, "
                                                                       "max 9, output empirical n=9 [trace t.jsonl]"))
    with pytest.raises(ValueError, match="--input-len"):
        workload_from_plan(trace)
    assert errors_pct({"a": 100.0, "b": None}, {"a": 110.0, "b": 1.0}) == {"a": pytest.approx(10.0), "b": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_behind_openai_route(tmp_path):
    pytest.importorskip("ray.serve")
    openai = pytest.importorskip("openai")
    from tiny_model import write_tiny_model

    folder = write_tiny_model(str(tmp_path / "tiny"))
    spec = FleetSpec(EngineConfig(model=folder, device="cpu", kv_cache_bytes=16 << 20, max_num_seqs=4),
                     replicas=2, port=_free_port())
    fleet = LocalFleet(spec, num_cpus=2, timeout_s=150)
    try:
        fleet.start()
        assert len(still_running(fleet.processes)) >= 4, "the local Ray's processes (GCS, raylet, replicas...)"
        assert fleet.info["num_cpus_per_replica"] == 1.0 and fleet.info["threads_per_replica"] == 1
        assert replica_states() == {"RUNNING": 2}

        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        (model,) = [m.id for m in client.models.list().data]
        assert model == "tiny"

        def complete(i: int):
            raw = client.completions.with_raw_response.create(model=model, prompt=f"request {i}: hello",
                                                              max_tokens=4, temperature=0.0, extra_body={
                                                                  "ignore_eos": True})
            return raw.headers.get("x-pernode-replica"), raw.parse()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            served = list(pool.map(complete, range(8)))
        assert all(r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length" for _, r in served)
        replicas = {rid for rid, _ in served}
        for i in range(8, 24):  # the router picks at random between idle replicas; both show up within a few
            if len(replicas) == 2:
                break
            replicas.add(complete(i)[0])
        assert None not in replicas and len(replicas) == 2, f"replicas seen: {replicas}"

        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, stream=True, extra_body={"ignore_eos": True},
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 6
        assert chunks[-2].choices[0].finish_reason == "length"
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # it really streamed
    finally:
        left = fleet.stop()
    import ray

    assert not ray.is_initialized()
    assert left == [] and still_running(fleet.processes) == [], f"Ray processes left: {left}"


def test_same_trace_prediction_replays_the_requests_sent():
    from test_fleet_planner import SLO_LOOSE, WORKLOAD, toy_profile

    from pernode.price.planner import plan
    from pernode.jobs.validate import predicted_from_plan, predicted_same_trace
    from pernode.measure.bench.datasets import BenchRequest

    prof = toy_profile(step_s=0.05)
    p = plan(prof, WORKLOAD, SLO_LOOSE, 2.0).to_dict()
    requests = [BenchRequest(prompt="x", messages=None, prompt_len=100, max_tokens=11) for _ in range(4)]
    alone = predicted_same_trace(prof, p, requests, [0.0, 100.0, 200.0, 300.0], token_budget=2048)
    # Each request runs alone: TPOT is one decode step, TTFT its prefill (100 tokens at 10k tokens/s).
    assert alone["tpot_p50_ms"] == pytest.approx(50.0)
    assert alone["ttft_p50_ms"] == pytest.approx(10.0)
    assert alone["attainment"] == 1.0
    predicted = predicted_from_plan(p)
    assert set(predicted) <= set(alone)
    assert predicted["ttft_p99_ms"] == pytest.approx(p["latency_s"]["ttft"]["p99"] * 1e3)


def test_fleet_up_flags_take_the_plan(tmp_path):
    from pernode.cli import build_parser
    from pernode.cli.fleet import spec_from_args

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    args = build_parser().parse_args(["fleet", "up", "--model", "m", "--plan", str(path), "--autoscale", "plan",
                                      "--port", "8123", "--num-cpus-per-replica", "0.5"])
    spec = spec_from_args(args)
    assert (spec.replicas, spec.engine.max_num_seqs, spec.port) == (2, 8, 8123)  # the plan's max batch
    assert spec.autoscale == Autoscale(2, 4, 3.0) and spec.num_cpus_per_replica == 0.5
    args = build_parser().parse_args(["fleet", "up", "--model", "m", "--replicas", "3", "--autoscale", "1,3,5"])
    spec = spec_from_args(args)
    assert spec.replicas == 3 and spec.engine.max_num_seqs == 256 and spec.autoscale == Autoscale(1, 3, 5.0)
    assert build_parser().parse_args(["fleet", "down"]).func.__name__ == "run_down"
