"""The figures `validate` sets side by side: what the plan predicted, what the same simulator predicts for the exact
requests sent, and what the fleet measured; each error as (measured - predicted) / predicted in percent.

Two predictions: the plan's own (its simulated trace of `simulated_requests`), and, with a profile, the same
simulator replaying the exact requests sent (the bench's arrival times and lengths), which takes sampling noise out
of the comparison and leaves the model's error.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.bench.datasets import BenchRequest
from pernode.measure.profile.profile_schema import Profile
from pernode.price.fleet_result import FleetSimResult
from pernode.price.node_speed import NodeSpeed
from pernode.price.planner import Plan
from pernode.price.replica import ReplicaConfig
from pernode.price.simulator import simulate_fleet
from pernode.price.intervals import seed_intervals, summary_values, where_in_interval
from pernode.price.step_time import StepTimeModel
from pernode.price.max_batch import kv_block_size, kv_max_tokens
from pernode.price.workload import RequestTrace, Workload
from pernode.serve.deploy import ROUTER_POLICY


@dataclass(frozen=True)
class Metric:
    """One row of the comparison: its label, its key in the report, and for a latency which one."""

    label: str
    key: str  # in the report's predicted, measured and error_pct
    latency: tuple[str, int] | None = None  # (measure, percentile), as in the plan's latency_s["ttft"]["p50"]


def _latency(label: str, measure: str, percentile: int) -> Metric:
    return Metric(label, f"{measure}_p{percentile}_ms", (measure, percentile))


METRICS = (Metric("goodput (req/s)", "goodput_rps"),
           Metric("SLO attainment", "attainment"),
           _latency("TTFT p50 (ms)", "ttft", 50),
           _latency("TTFT p99 (ms)", "ttft", 99),
           _latency("TPOT p50 (ms)", "tpot", 50),
           _latency("TPOT p99 (ms)", "tpot", 99),
           _latency("E2E p50 (ms)", "e2e", 50),
           _latency("E2E p99 (ms)", "e2e", 99))
BENCH_LATENCY = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el"}  # the planner's names -> bench serve's (vLLM's)


def predicted_from_plan(plan: Plan) -> dict:
    out: dict[str, float | None] = {"goodput_rps": plan.goodput_rps, "attainment": plan.attainment}
    for m in METRICS:
        if m.latency is not None:
            measure, percentile = m.latency
            v = (plan.latency_s.get(measure) or {}).get(f"p{percentile}")
            out[m.key] = None if v is None else v * 1000.0
    return out


def predicted_same_trace(profile: Profile, plan: Plan, requests: Sequence[BenchRequest], offsets_s,
                         token_budget: int, prompt_tokens: Sequence[int] | None = None) -> dict:
    """The planner's simulator on exactly the requests `bench serve` sends: same arrivals, prompts, outputs.
    `prompt_tokens`, when given, are the prompt lengths the server counted (its usage), else the bench's."""
    prompt = prompt_tokens if prompt_tokens is not None else [r.prompt_len for r in requests]
    return predicted_for_trace(profile, plan, offsets_s, prompt, [r.max_tokens for r in requests], token_budget)


def predicted_for_trace(profile: Profile, plan: Plan, offsets_s, prompt_tokens, output_tokens,
                        token_budget: int, mixed_steps: bool = False) -> dict:
    """The planner's simulator on a recorded trace: arrival offsets and each request's prompt and output tokens."""
    return summary_values(simulated_trace(profile, plan, offsets_s, prompt_tokens, output_tokens, token_budget,
                                          mixed_steps), plan.slo)


def simulated_trace(profile: Profile, plan: Plan, offsets_s, prompt_tokens, output_tokens, token_budget: int,
                    mixed_steps: bool = False, node_speed: NodeSpeed | None = None) -> FleetSimResult:
    """The simulator's run of a recorded trace, request by request; with `node_speed`, at that speed over time."""
    prompt = np.asarray(prompt_tokens, dtype=np.int64)
    output = np.asarray(output_tokens, dtype=np.int64)
    replica = replica_config(profile, plan, float(prompt.mean() + output.mean() / 2.0), token_budget, mixed_steps)
    if node_speed is not None:
        replica = dataclasses.replace(replica, node_speed=node_speed)
    trace = RequestTrace(np.asarray(offsets_s, dtype=np.float64), prompt, output)
    return simulate_fleet(trace, replica, int(plan.replicas), ROUTER_POLICY)


def replica_config(profile: Profile, plan: Plan, mean_decode_context: float, token_budget: int,
                   mixed_steps: bool = False) -> ReplicaConfig:
    """One replica as the fleet runs it: the profile's step times (and serving path), the plan's max batch, the
    profile's KV cache and block size, the engine's token budget."""
    step_model = StepTimeModel.from_profile(profile, context_tokens=mean_decode_context, mixed_steps=mixed_steps)
    return ReplicaConfig(step_model, int(plan.max_batch.batch_size), kv_max_tokens(profile), token_budget,
                         kv_block_size(profile))


def predicted_interval(profile: Profile, plan: Plan, workload: Workload, num_prompts: int, seeds: list[int],
                       token_budget: int, mixed_steps: bool = False) -> dict:
    """The range each figure takes over runs of `num_prompts` requests drawn from `workload` with each seed: how
    far a run of the measured size may fall from another by chance alone."""
    mean_decode_context = workload.mean_input_tokens + workload.mean_output_tokens / 2.0
    replica = replica_config(profile, plan, mean_decode_context, token_budget, mixed_steps)
    return seed_intervals(lambda s: workload.generate(num_prompts, s), replica, int(plan.replicas), ROUTER_POLICY,
                          plan.slo, seeds)


def interval_positions(interval: Mapping[str, Any], measured: Mapping[str, Any]) -> dict:
    """Per figure: is the measurement inside the predicted range, above or below it."""
    return {k: where_in_interval(measured.get(k), interval.get(k)) for k in measured if k in interval}


def measured_from_bench(result: BenchResult) -> dict:
    metrics = result.metrics
    good = metrics.good_requests  # counted by the plan's SLO rule (`SLO.met`)
    out = {"goodput_rps": metrics.request_goodput_per_s,
           "attainment": None if good is None else good / result.num_prompts}
    for m in METRICS:
        if m.latency is not None:
            measure, percentile = m.latency
            stats = metrics.latency(BENCH_LATENCY[measure])
            out[m.key] = stats.median_ms if percentile == 50 else stats.percentile_ms(percentile)
    return out


def errors_pct(predicted: Mapping[str, Any], measured: Mapping[str, Any]) -> dict:
    """(measured - predicted) / |predicted| in percent, per key; None where either side has no finite number."""
    out = {}
    for k, p in predicted.items():
        m = measured.get(k)
        ok = isinstance(p, (int, float)) and isinstance(m, (int, float)) and math.isfinite(p) and p != 0
        out[k] = (m - p) / abs(p) * 100.0 if ok else None
    return out


def idle_probe_report(result: BenchResult, profile: Profile | None) -> dict:
    """What the serving path adds with no queueing: each probe request's TTFT against the profile's prefill time
    for its own prompt length (the server's usage count), and its TPOT against one decode step at batch 1."""
    rows = [r for r in result.per_request if r.success]
    out: dict = {"requests": len(rows), "max_concurrency": 1,
                 "measured": {"ttft_p50_ms": _median_ms(r.ttft_s for r in rows),
                              "tpot_p50_ms": _median_ms(r.tpot_s for r in rows)}}
    if profile is not None and rows:
        mean_context = float(np.mean([r.prompt_tokens + r.output_tokens / 2.0 for r in rows]))
        step_model = StepTimeModel.from_profile(profile, context_tokens=mean_context)
        out["added_ms"] = {
            "ttft_p50": _median_ms(r.ttft_s - step_model.prefill_s(r.prompt_tokens) for r in rows),
            "tpot_p50": _median_ms(r.tpot_s - step_model.decode_step_s(1) for r in rows if r.tpot_s is not None)}
    return out


def _median_ms(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) * 1000.0 if v else None
