"""`fleet validate` itself: bring up the plan's fleet (or use a running one), send the plan's workload, compare.

Brings up the plan's replicas on Ray Serve with `max_num_seqs` = the plan's max batch per replica, sends an idle
probe (a few requests one at a time: what the serving path adds before any queueing) and then the plan's workload
with `bench serve`, and reports predicted vs measured goodput, SLO attainment, TTFT, TPOT and E2E percentiles.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

from pernode.config import EngineConfig
from pernode.jobs.fleet_from_plan import fleet_spec_for_plan, plan_replicas
from pernode.jobs.validate.compare import (errors_pct, idle_probe_report, interval_positions, measured_from_bench,
                                           predicted_from_plan, predicted_interval,
                                           replica_config, simulated_trace)
from pernode.jobs.validate.config import ValidateConfig
from pernode.jobs.validate.cpu_share import CpuShare
from pernode.jobs.validate.engine_busy import engine_busy
from pernode.jobs.validate.machine_split import split_machine
from pernode.jobs.validate.replay import ReplayWorkload, recorded_trace, tokenizer_path
from pernode.jobs.validate.report import print_validation, write_report
from pernode.jobs.validate.request_agreement import measured_requests, request_agreement
from pernode.jobs.validate.speed_anchor import anchor_requests, anchored_prediction
from pernode.jobs.validate.ttft_parts import scrape_server_timing, ttft_parts
from pernode.measure.bench.server_timing import step_records
from pernode.measure.bench.bench_serve import run_bench
from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.bench.config import BenchConfig
from pernode.measure.profile.profile_schema import Profile, load_profile
from pernode.price.intervals import summary_values
from pernode.price.planner import Plan
from pernode.price.workload import LengthDist, Workload
from pernode.serve.deploy import REPLICA_HEADER, ROUTER_POLICY, LocalFleet, free_port
from pernode.serve.server.options import ServerSettings

IDLE_PROBE_REQUESTS = 8  # one at a time before the run: the serving path's own latency, without queueing
DEFAULT_TOKEN_BUDGET = 512  # the engine's default step budget on CPU
MIN_QUEUED_REQUESTS = 256
STEP_RECORD_TRIES = 32  # through Ray's router, to reach the replica whose step records a run started from


@dataclass(frozen=True)
class Measured:
    """One pass against a fleet: the workload's bench config and result, the idle probe's result, the speed
    anchor's, and the cores used during the workload."""

    bench: BenchConfig
    result: BenchResult
    probe_result: BenchResult
    cpu_cores_used: dict
    server_timing: tuple[dict | None, dict | None] = (None, None)  # /metrics before and after the workload
    anchor: dict | None = None  # the speed anchor's trace and step records (speed_anchor.py)
    steps: list | None = None  # the server's step records over the workload


def measure(url: str, workload: ReplayWorkload, plan: Plan, config: ValidateConfig, num_prompts: int,
            tokenizer: str | None) -> Measured:
    """The idle probe first (it also warms every replica's HTTP path), the speed anchor, then the plan's
    workload."""
    probe = dataclasses.replace(
        workload.bench_config(url, IDLE_PROBE_REQUESTS, config.seed + 1, plan.slo, tokenizer,
                              num_warmup=2 * plan_replicas(plan)), max_concurrency=1, no_progress=True)
    probe_result = run_bench(probe)
    anchor = None
    n_anchor = anchor_requests(workload.rate_rps, config.anchor_s)
    if n_anchor:
        anchor_bench = dataclasses.replace(
            workload.bench_config(url, n_anchor, config.seed + 2, plan.slo, tokenizer, num_warmup=0),
            no_progress=True)
        first = _next_step(url)
        anchor_result = run_bench(anchor_bench)
        anchor = {"requests": n_anchor, "seed": anchor_bench.seed, "failed_requests": anchor_result.metrics.failed,
                  "trace": recorded_trace(anchor_bench, anchor_result), "steps": _steps_from(url, first)}
    bench = dataclasses.replace(workload.bench_config(url, num_prompts, config.seed, plan.slo, tokenizer,
                                                      num_warmup=0), out=config.bench_out)
    before = scrape_server_timing(url)
    first = _next_step(url)
    share = CpuShare()
    result = run_bench(bench)
    used = share.stop()
    return Measured(bench, result, probe_result, used, (before, scrape_server_timing(url)), anchor,
                    _steps_from(url, first))


def _next_step(url: str) -> tuple[str | None, int] | None:
    """(the replica that answered, the index of its next step); None without step records."""
    body = step_records(url, replica_header=REPLICA_HEADER)
    return None if body is None else (body["replica"], int(body["next"]))


def _steps_from(url: str, first: tuple[str | None, int] | None) -> list | None:
    """The step records of the replica `first` names from its step index on. Through Ray each call reaches a
    replica at random: ask again until the same one answers."""
    if first is None:
        return None
    replica, index = first
    for _ in range(STEP_RECORD_TRIES):
        body = step_records(url, after=index - 1, replica_header=REPLICA_HEADER)
        if body is None:
            return None
        if body["replica"] == replica:
            return body["steps"]
    return None


def run_validate(config: ValidateConfig, engine: EngineConfig) -> int:
    """Validate the plan at `config.plan_path` on a fleet of `engine`s; 0 when every request succeeded."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    plan = Plan.load(config.plan_path)
    profile = load_profile(config.profile_path) if config.profile_path else None
    workload = ReplayWorkload.from_workload(plan.workload, config.input_len, config.output_len, config.burstiness)
    replicas = plan_replicas(plan)
    batch = int(plan.max_batch.batch_size)
    num_prompts = config.num_prompts_at(workload.rate_rps)
    engine = dataclasses.replace(engine, max_num_seqs=batch)
    tokenizer = tokenizer_path(engine.model)  # exact prompt lengths; with base_url, the model served
    load_before = os.getloadavg()
    started = time.monotonic()
    if config.base_url:
        fleet_info: dict = {"base_url": config.base_url}
        measured = measure(config.base_url, workload, plan, config, num_prompts, tokenizer)
    else:
        # Room for every request of the run to wait in an engine: a 429 would be a failure, not a latency.
        settings = ServerSettings(max_queued_requests=max(MIN_QUEUED_REQUESTS, num_prompts))
        placement = config.placement
        spec = fleet_spec_for_plan(plan, engine, settings, num_cpus_per_replica=placement.num_cpus_per_replica,
                                   threads_per_replica=placement.threads_per_replica,
                                   max_ongoing_requests=placement.max_ongoing_requests,
                                   cpusets=placement.cpusets, port=placement.port or free_port())
        with LocalFleet(spec) as fleet:
            fleet_info = fleet.deployment.to_dict()
            fleet_info["machine_split"] = split_machine(fleet.deployment.cpuset_claim_dir, placement.client_cpuset)
            print(f"pernode fleet validate: {replicas} replicas (max_num_seqs {batch}) up at {fleet.url} in "
                  f"{fleet.deployment.startup_s:.1f} s; sending {num_prompts} requests at "
                  f"{workload.rate_rps:g} req/s", flush=True)
            measured = measure(fleet.url, workload, plan, config, num_prompts, tokenizer)
    result = measured.result
    predicted = predicted_from_plan(plan)
    observed = measured_from_bench(result)
    report = {
        "kind": "fleet_validate",
        "plan": os.path.abspath(config.plan_path),
        "profile": os.path.abspath(config.profile_path) if config.profile_path else None,
        "model": engine.model,
        "replicas": replicas,
        "max_num_seqs": batch,
        "router": ROUTER_POLICY,
        "fleet": fleet_info,
        "workload": {**workload.to_dict(), "num_prompts": num_prompts, "seed": config.seed, "ignore_eos": True},
        "slo_ms": plan.slo.to_dict(),
        "predicted": predicted,
        "measured": observed,
        "error_pct": errors_pct(predicted, observed),
        "failed_requests": result.metrics.failed,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        # cores used during the measured run by this process and the fleet it started, and by everything else
        "cpu_cores_used": measured.cpu_cores_used,
        "wall_s": time.monotonic() - started,
        "notes": _notes(plan, profile) + list(result.notes),
    }
    if profile is not None:
        budget = config.token_budget or engine.max_num_batched_tokens or DEFAULT_TOKEN_BUDGET
        report.update(_same_trace(profile, plan, measured, budget, observed))
        workload_drawn = Workload(workload.rate_rps, LengthDist.parse(workload.input_len, "input_len"),
                                  LengthDist.parse(workload.output_len, "output_len"), workload.burstiness)
        interval = predicted_interval(profile, plan, workload_drawn, num_prompts,
                                      [config.seed + k for k in range(config.interval_seeds)], budget)
        report["predicted_interval"] = interval
        report["interval_position"] = interval_positions(interval, observed)
    else:
        report.update({"speed_anchor": measured.anchor, "run_steps": measured.steps})
    report["idle_probe"] = idle_probe_report(measured.probe_result, profile)
    print_validation(report)
    if config.out:
        write_report(report, config.out)
    return 0 if not result.metrics.failed else 1


def _same_trace(profile: Profile, plan: Plan, measured: Measured, token_budget: int,
                observed: dict) -> dict:
    """The same-trace prediction of the requests `measured.bench` sent, at the prompt lengths the server
    counted where it answered."""
    trace = recorded_trace(measured.bench, measured.result)
    offsets_s, counted = trace["offsets_s"], trace["prompt_tokens"]
    sim = simulated_trace(profile, plan, offsets_s, counted, trace["output_tokens"], token_budget)
    same = summary_values(sim, plan.slo)
    parts = ttft_parts(*measured.server_timing, measured.result, sim,
                       replica_config(profile, plan, 1.0, token_budget).step_model.serving_request_s)
    busy = engine_busy(*measured.server_timing, sim)
    requests = measured_requests(measured.result)
    anchored = (anchored_prediction(measured.anchor, measured.steps, profile, plan, trace, observed, token_budget,
                                    requests=requests) if measured.anchor else {})
    # The trace itself, so that `pernode fleet rescore` can predict this run again from another profile or model.
    return {**anchored, "predicted_same_trace": same, "error_pct_same_trace": errors_pct(same, observed),
            "request_agreement_same_trace": request_agreement(sim, requests), "measured_requests": requests,
            "token_budget": token_budget, "same_trace_requests": trace, "ttft_parts": parts, "engine_busy": busy,
            "server_timing_before_after": list(measured.server_timing), "run_steps": measured.steps}


def _notes(plan: Plan, profile: Profile | None) -> list[str]:
    notes = []
    if plan.policy != ROUTER_POLICY:
        notes.append(f"the plan assumed policy {plan.policy}; Ray Serve's router is modelled by {ROUTER_POLICY}")
    if profile is not None:
        planned, given = plan.model_name, (profile.get("model") or {}).get("name")
        if planned and given and planned != given:
            notes.append(f"the profile is of {given} but the plan is of {planned}")
    return notes
