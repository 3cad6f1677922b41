"""`pernode fleet rescore`: predict a recorded validation run again, from another profile or a changed model.

A validation JSON keeps the exact requests it sent (arrival offsets, prompt and output tokens) and what was measured.
Rescoring replays that trace through the planner's simulator with the profile given, and sets the new prediction
beside the same measurements: two step-time models, or two profiles of one node, compared on one real run. A run
with a speed anchor has its engine speed set against the new profile, and its anchored prediction redone.
`mixed_steps` predicts with the profile's measured mixed steps (price/step_time.py), off by default as in the planner.

`serving_path_from_probe` replaces the profile's serving path (measured against a plain `pernode serve`) by what the
run's own idle probe measured through the fleet's path (Ray Serve's proxy and the replica's streaming), one request
at a time before the load: it tells model error from a serving path the profile did not see.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from pernode.jobs.validate.compare import (errors_pct, interval_positions, predicted_interval, replica_config,
                                           simulated_trace)
from pernode.jobs.validate.engine_busy import engine_busy
from pernode.jobs.validate.report import print_validation, write_report
from pernode.jobs.validate.request_agreement import request_agreement
from pernode.jobs.validate.speed_anchor import anchored_prediction
from pernode.jobs.validate.ttft_parts import ttft_parts
from pernode.measure.profile.profile_schema import load_profile
from pernode.price.fleet_plan import Plan
from pernode.price.intervals import summary_values
from pernode.price.workload import LengthDist, Workload


def rescore(report_path: str, profile_path: str, plan_path: str | None = None, interval_seeds: int = 5,
            serving_path_from_probe: bool = False, mixed_steps: bool = False) -> dict:
    """The validation report at `report_path` with its same-trace prediction (and range) made from `profile_path`."""
    report = json.loads(Path(report_path).read_text())
    trace = report.get("same_trace_requests")
    if not isinstance(trace, dict):
        raise ValueError(f"{report_path}: no same_trace_requests; it was written by a `pernode fleet validate` "
                         f"without --profile or before traces were recorded; run the validation again")
    plan = Plan.load(plan_path or report["plan"])
    profile = load_profile(profile_path)
    measured = report["measured"]
    if serving_path_from_probe:
        profile = _with_probed_serving_path(profile, report)
    budget = int(report["token_budget"])
    sim = simulated_trace(profile, plan, trace["offsets_s"], trace["prompt_tokens"], trace["output_tokens"], budget,
                          mixed_steps)
    same = summary_values(sim, plan.slo)
    requests = report.get("measured_requests")  # the client's latencies per request, in newer reports
    out = dict(report)
    if isinstance(requests, dict):
        out["request_agreement_same_trace"] = request_agreement(sim, requests)
    parts = report.get("ttft_parts")
    if isinstance(parts, dict):  # the measured split stays; the predicted one is the new model's
        step_model = replica_config(profile, plan, 1.0, budget).step_model
        out["ttft_parts"] = {"measured": parts.get("measured"),
                             "predicted": ttft_parts(None, None, None, sim, step_model.serving_request_s)["predicted"]}
    timing = report.get("server_timing_before_after")
    if isinstance(timing, list) and len(timing) == 2:  # the measured step clock stays; the predicted busy time is new
        out["engine_busy"] = engine_busy(timing[0], timing[1], sim)
    anchor = report.get("speed_anchor")
    if isinstance(anchor, dict) and isinstance(anchor.get("trace"), dict):  # the node's speed, against this profile
        base = {k: v for k, v in anchor.items() if k != "engine_speed"}
        out.update(anchored_prediction(base, report.get("run_steps"), profile, plan, trace, measured, budget,
                                       mixed_steps, requests if isinstance(requests, dict) else None))
    out.update({"profile": os.path.abspath(profile_path), "rescored_from": os.path.abspath(report_path),
                "serving_path_from_probe": profile.get("serving_path") if serving_path_from_probe else None,
                "mixed_steps": mixed_steps,
                "predicted_same_trace": same, "error_pct_same_trace": errors_pct(same, measured)})
    w = report["workload"]
    workload = Workload(float(w["rate_rps"]), LengthDist.parse(w["input_len"], "input_len"),
                        LengthDist.parse(w["output_len"], "output_len"), float(w["burstiness"]))
    seed = int(w.get("seed", 0))
    interval = predicted_interval(profile, plan, workload, len(trace["offsets_s"]),
                                  [seed + k for k in range(interval_seeds)], budget, mixed_steps)
    out["predicted_interval"] = interval
    out["interval_position"] = interval_positions(interval, measured)
    return out


def _with_probed_serving_path(profile: dict, report: dict) -> dict:
    """`profile` with the serving path the report's idle probe measured: per request, its TTFT beyond the
    profile's prefill; per token, its TPOT beyond the profile's batch-1 step (which already held the profile's
    own token term). Negative medians count as 0."""
    added = (report.get("idle_probe") or {}).get("added_ms")
    if not isinstance(added, dict) or added.get("ttft_p50") is None or added.get("tpot_p50") is None:
        raise ValueError("the report's idle_probe has no added_ms: it was validated without --profile; "
                         "rescore without --serving-path-from-probe")
    out = copy.deepcopy(profile)
    own_token_s = float((profile.get("serving_path") or {}).get("token_s", 0.0))
    out["serving_path"] = {"request_s": max(0.0, added["ttft_p50"] / 1000.0),
                           "token_s": max(0.0, own_token_s + added["tpot_p50"] / 1000.0),
                           "method": "the validation run's idle probe, through the fleet's own path"}
    return out


def run_rescore(report_path: str, profile_path: str, plan_path: str | None, out: str | None,
                interval_seeds: int = 5, serving_path_from_probe: bool = False, mixed_steps: bool = False) -> int:
    report = rescore(report_path, profile_path, plan_path, interval_seeds, serving_path_from_probe, mixed_steps)
    print_validation(report)
    if out:
        write_report(report, out)
    return 0
