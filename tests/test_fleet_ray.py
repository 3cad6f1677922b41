"""`pernode fleet` on Ray Serve: two replicas of a tiny model behind the OpenAI route, on loopback, then a clean
shutdown; and the pieces that need no Ray (a plan as a fleet, autoscaling, CPU shares, the plan's workload)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console
from test_fleet_planner import SLO_LOOSE, WORKLOAD, toy_profile

from pernode.config import EngineConfig
from pernode.jobs.fleet_from_plan import autoscale_for_plan, fleet_spec_for_plan
from pernode.jobs.validate.machine_split import split_machine
from pernode.jobs.validate import (METRICS, FleetPlacement, ReplayWorkload, ValidateConfig, errors_pct,
                                   measured_from_bench, predicted_from_plan, predicted_same_trace, print_validation)
from pernode.measure.bench.bench_result import BenchResult, LatencyStats, ServingMetrics
from pernode.measure.bench.datasets import BenchRequest
from pernode.price.planner import Plan, plan
from pernode.price.workload import LengthDist, Workload
from pernode.serve.deploy import (ROUTER_POLICY, Autoscale, Deployment, FleetSpec, LocalFleet, build_application,
                                  free_port, replica_states, still_running)
from pernode.serve.server.options import ServerSettings


def planned(**changes) -> Plan:
    """A feasible plan of 2 replicas at max batch 8 for 3 req/s, prompts uniform 32..128, outputs 48 tokens."""
    workload = Workload(3.0, LengthDist.uniform(32, 128), LengthDist.fixed(48))
    p = plan(toy_profile(), workload, SLO_LOOSE, 2.0, num_requests=500, interval_seeds=1)
    p = dataclasses.replace(p, replicas=2, max_batch=dataclasses.replace(p.max_batch, batch_size=8),
                            latency_s={**p.latency_s, "e2e": {"p50": 2.0, "p99": 3.0}})
    return dataclasses.replace(p, **changes)


def test_autoscale_parse_and_for_load():
    assert Autoscale.parse("1,4,8") == Autoscale(1, 4, 8.0)
    with pytest.raises(ValueError, match="MIN,MAX"):
        Autoscale.parse("1,4")
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        Autoscale.parse("3,2,8")
    # Little's law at the planned rate: 3 req/s x 2 s / 2 replicas = 3 ongoing each; floor = plan, ceiling = 2x
    assert Autoscale.for_load(2, rate_rps=3.0, e2e_p50_s=2.0, max_batch=8) == Autoscale(2, 4, 3.0)
    assert Autoscale.for_load(2, 30.0, 2.0, max_batch=8).target_ongoing_requests == 8.0  # at most a full batch
    assert Autoscale.for_load(2, 3.0, None, max_batch=8).target_ongoing_requests == 8.0  # no latency: a batch
    assert autoscale_for_plan(planned()) == Autoscale(2, 4, 3.0)
    assert autoscale_for_plan(planned()).to_config()["initial_replicas"] == 2
    assert Autoscale.from_config(Autoscale(2, 4, 3.0).to_config()) == Autoscale(2, 4, 3.0)


def test_fleet_spec_round_trip_and_errors():
    spec = FleetSpec(EngineConfig(model="m", max_num_seqs=8), ServerSettings(max_queued_requests=64), replicas=3,
                     autoscale=Autoscale(1, 4, 2.5), num_cpus_per_replica=0.5, port=8123, app_name="a")
    assert FleetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.replica_max_ongoing_requests == 8 + 64
    with pytest.raises(ValueError, match=r"^replicas=0: allowed >= 1"):
        FleetSpec(EngineConfig(model="m"), replicas=0)
    with pytest.raises(ValueError, match=r"^num_cpus_per_replica=0"):
        FleetSpec(EngineConfig(model="m"), num_cpus_per_replica=0)
    deployment = Deployment(url="http://127.0.0.1:8123", app_name="a", replicas=3, autoscale=Autoscale(1, 4, 2.5),
                            num_cpus_per_replica=0.5, threads_per_replica=1, max_ongoing_requests=72,
                            cluster_cpus=2.0, startup_s=1.5)
    assert Deployment.from_dict(json.loads(json.dumps(deployment.to_dict()))) == deployment
    assert deployment.to_dict()["planner_policy"] == ROUTER_POLICY


def test_plan_as_fleet_spec():
    p = planned()
    spec = fleet_spec_for_plan(p, EngineConfig(model="m", max_num_seqs=256), port=8123)
    assert (spec.replicas, spec.engine.max_num_seqs, spec.engine.model, spec.port) == (2, 8, "m", 8123)
    assert spec.autoscale is None
    spec = fleet_spec_for_plan(p, EngineConfig(model="m"), replicas=3, autoscale_to_plan=True)
    assert spec.replicas == 3 and spec.autoscale == Autoscale(2, 4, 3.0)  # the given replicas win
    with pytest.raises(ValueError, match="not feasible"):
        fleet_spec_for_plan(planned(feasible=False, replicas=None, reason="too slow"), EngineConfig(model="m"))


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
    app, resources = build_application(spec, cluster_cpus=2.0)
    d = app._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_cpus"] == 0.5
    assert d.ray_actor_options["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert d.max_ongoing_requests == 8 + 256  # the router holds nothing back: engines queue, as the planner models
    assert (resources.num_cpus, resources.threads, resources.max_ongoing_requests) == (0.5, 1, 8 + 256)
    assert ROUTER_POLICY == "least_outstanding"
    spec = FleetSpec(EngineConfig(model="x"), autoscale=Autoscale(1, 4, 6))
    app, _ = build_application(spec, cluster_cpus=4.0)
    cfg = app._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 6)


def test_workload_and_errors_from_plan():
    w = ReplayWorkload.from_workload(planned().workload)
    assert w.to_dict() == {"rate_rps": 3.0, "input_len": "32:128", "output_len": "48", "burstiness": 1.0}
    bursty = Workload(2.0, LengthDist.fixed(64), LengthDist.uniform(8, 16), burstiness=0.5)
    assert ReplayWorkload.from_workload(bursty).burstiness == 0.5
    assert ReplayWorkload.from_workload(bursty).output_len == "8:16"
    assert ReplayWorkload.from_workload(bursty, output_len="4", burstiness=2.0).to_dict() == {
        "rate_rps": 2.0, "input_len": "64", "output_len": "4", "burstiness": 2.0}  # the overrides win
    trace = Workload(2.0, LengthDist.empirical([5, 9]), LengthDist.empirical([3, 4]), paired=True)
    with pytest.raises(ValueError, match=r"^input_len=empirical"):
        ReplayWorkload.from_workload(trace)
    assert ReplayWorkload.from_workload(trace, "5:9", "3:4").input_len == "5:9"
    cfg = w.bench_config("http://h:1", 10, 0, SLO_LOOSE, None, num_warmup=0)
    assert (cfg.slo, cfg.random_input_len, cfg.ignore_eos) == ("ttft_ms=2000,tpot_ms=100", "32:128", True)
    assert errors_pct({"a": 100.0, "b": None}, {"a": 110.0, "b": 1.0}) == {"a": pytest.approx(10.0), "b": None}


def test_measured_from_bench_result_and_table():
    def stats(median_ms: float, p99_ms: float) -> LatencyStats:
        return LatencyStats(None, median_ms, None, ((50.0, median_ms), (99.0, p99_ms)))

    metrics = ServingMetrics(4, 4, (), 2.0, 400, 40, 2.0, 20.0, 220.0, {"ttft_ms": 500.0}, 3, 1.5, ttft=stats(10, 20),
                             tpot=stats(1, 2), itl=stats(1, 2), e2el=stats(100, 200))
    result = BenchResult("2026-01-01T00:00:00+00:00", "http://h:1", "m", "completions", "random", None, 4, 2.0, 1.0,
                         None, 0, True, (50.0, 99.0), metrics)
    measured = measured_from_bench(result)
    assert measured == {"goodput_rps": 1.5, "attainment": 0.75, "ttft_p50_ms": 10, "ttft_p99_ms": 20,
                        "tpot_p50_ms": 1, "tpot_p99_ms": 2, "e2e_p50_ms": 100, "e2e_p99_ms": 200}
    predicted = predicted_from_plan(planned())
    assert set(predicted) == set(measured) == {m.key for m in METRICS}
    report = {"replicas": 2, "max_num_seqs": 8, "fleet": {"base_url": "http://h:1"}, "predicted": predicted,
              "measured": measured, "error_pct": errors_pct(predicted, measured),
              "workload": {"rate_rps": 3.0, "input_len": "32:128", "output_len": "48", "num_prompts": 4}}
    console = Console(file=io.StringIO(), width=200)
    print_validation(report, console)
    text = console.file.getvalue()
    assert "2 replicas x max batch 8" in text and all(m.label in text for m in METRICS)


def test_validate_config():
    cfg = ValidateConfig("plan.json", num_prompts=20, input_len="8:16", placement=FleetPlacement(port=8123))
    assert ValidateConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.num_prompts_at(3.0) == 20 and ValidateConfig("p").num_prompts_at(3.0) == 360
    with pytest.raises(ValueError, match=r"^num_prompts=0: allowed >= 1"):
        ValidateConfig("plan.json", num_prompts=0)


def listening_hosts(port: int) -> set[str]:
    """The addresses a TCP socket listens on `port` at, from /proc/net/tcp and tcp6 (hex, as the kernel writes)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                hosts.add({"0100007F": "127.0.0.1", "00000000": "0.0.0.0"}.get(host, host))
    return hosts


def test_two_replicas_behind_openai_route(tmp_path):
    pytest.importorskip("ray.serve")
    openai = pytest.importorskip("openai")
    from tiny_model import write_tiny_model

    folder = write_tiny_model(str(tmp_path / "tiny"))
    cores = sorted(os.sched_getaffinity(0))[:2]
    cpusets = tuple(str(c) for c in cores) if len(cores) == 2 else None  # one core each, pinned
    spec = FleetSpec(EngineConfig(model=folder, device="cpu", kv_cache_bytes=16 << 20, max_num_seqs=4),
                     replicas=2, port=free_port(), cpusets=cpusets)
    fleet = LocalFleet(spec, num_cpus=2, timeout_s=150)
    auth_before = os.environ.get("RAY_AUTH_MODE")
    try:
        fleet.start()
        assert len(still_running(fleet.processes)) >= 4, "the local Ray's processes (GCS, raylet, replicas...)"
        assert listening_hosts(spec.port) == {"127.0.0.1"}, "Serve's proxy listens on loopback only"
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        assert is_token_auth_enabled() and len(os.environ["RAY_AUTH_TOKEN"]) == 64  # Ray's token auth, our token
        assert fleet.deployment.num_cpus_per_replica == 1.0 and fleet.deployment.threads_per_replica == 1
        assert replica_states() == {"RUNNING": 2}
        if cpusets:  # each replica process runs on its own core, as read back from /proc
            split = split_machine(fleet.deployment.cpuset_claim_dir, None)
            assert split["replicas_on_own_cores"]
            assert sorted(r["cores"] for r in split["replicas"]) == sorted(cpusets)

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
    assert os.environ.get("RAY_AUTH_MODE") == auth_before  # the local Ray's auth settings leave with it
    assert left == [] and still_running(fleet.processes) == [], f"Ray processes left: {left}"


def test_same_trace_prediction_replays_the_requests_sent():
    prof = toy_profile(step_s=0.05)
    p = plan(prof, WORKLOAD, SLO_LOOSE, 2.0, num_requests=1000, interval_seeds=1)
    requests = [BenchRequest(prompt="x", messages=None, prompt_len=100, max_tokens=11) for _ in range(4)]
    alone = predicted_same_trace(prof, p, requests, [0.0, 100.0, 200.0, 300.0], token_budget=2048)
    # Each request runs alone: TPOT is one decode step, TTFT its prefill (100 tokens at 10k tokens/s).
    assert alone["tpot_p50_ms"] == pytest.approx(50.0)
    assert alone["ttft_p50_ms"] == pytest.approx(10.0)
    assert alone["attainment"] == 1.0
    predicted = predicted_from_plan(p)
    assert set(predicted) <= set(alone)
    assert predicted["ttft_p99_ms"] == pytest.approx(p.latency_s["ttft"]["p99"] * 1e3)


def test_fleet_up_flags_take_the_plan(tmp_path):
    from pernode.cli import build_parser
    from pernode.cli.fleet import spec_from_args, validate_config_from_args

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(planned().to_dict()))
    args = build_parser().parse_args(["fleet", "up", "--model", "m", "--plan", str(path), "--autoscale", "plan",
                                      "--port", "8123", "--num-cpus-per-replica", "0.5"])
    spec = spec_from_args(args)
    assert (spec.replicas, spec.engine.max_num_seqs, spec.port) == (2, 8, 8123)  # the plan's max batch
    assert spec.autoscale == Autoscale(2, 4, 3.0) and spec.num_cpus_per_replica == 0.5
    args = build_parser().parse_args(["fleet", "up", "--model", "m", "--replicas", "3", "--autoscale", "1,3,5"])
    spec = spec_from_args(args)
    assert spec.replicas == 3 and spec.engine.max_num_seqs == 256 and spec.autoscale == Autoscale(1, 3, 5.0)
    assert build_parser().parse_args(["fleet", "down"]).func.__name__ == "run_down"
    args = build_parser().parse_args(["fleet", "validate", "--plan", str(path), "--model", "m", "--port", "9",
                                      "--num-prompts", "5", "--output-len", "4"])
    cfg = validate_config_from_args(args)
    assert (cfg.plan_path, cfg.num_prompts, cfg.output_len, cfg.placement.port) == (str(path), 5, "4", 9)
