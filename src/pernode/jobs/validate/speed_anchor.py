"""The node's speed at validation time, step by step: the engine's own steps set against the profile's step-time
model, just before the measured run (the speed anchor) and during it.

A plan is made from a profile taken minutes or days earlier. On a shared host the same engine on the same core
drifted 5-30% within minutes (docs/fleet.md), and near capacity the latency errors move 2-3.5 points per 1% of
engine speed, so a plan checked against a node whose speed moved cannot tell a wrong model from a moved node.

The server keeps its last steps one by one (GET /metrics/steps: each step's wall and CPU seconds, its decodes and
prompt chunks). For each step the profile's model gives the engine's time for exactly that work (a decode step of
that batch, each chunk's tokens at its prompt's prefill rate), so their ratio is the engine's speed against its
profile at any load. Summed busy time cannot say that near capacity: there the engine is busy all the time at any
speed, and a slower engine only runs fewer, larger steps. The engine thread's CPU seconds are set against the model
(the profile times the engine alone on its core; what the serving threads take from that core is the serving
path's part of the model), the wall seconds are shown beside them.

The anchor sends `anchor_requests` requests of the workload's shape at its rate, with a seed of its own (none is
scored), before the run. Its ratio s is the node's speed of the moment; the anchored prediction is the run's
same-trace prediction with the engine's step and prefill times scaled by s. The plain prediction stays beside it,
and the run's own ratio says whether the speed held: the same trace predicted at that ratio takes the node's drift
out of the error and leaves the model's (after the fact, not a prediction). Through Ray with several replicas the records are those of
the replica that answered first (jobs/validate/run.py asks until the same one answers again).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np

from pernode.jobs.validate.compare import errors_pct, replica_config, simulated_trace
from pernode.measure.profile.profile_schema import Profile
from pernode.price.intervals import summary_values
from pernode.price.planner import Plan
from pernode.price.step_time import StepTimeModel

ANCHOR_SECONDS = 20.0  # of arrivals at the workload's rate: long enough to reach its steady batch
MIN_ANCHOR_REQUESTS = 12
MAX_ANCHOR_REQUESTS = 200
SCALE_RANGE = (0.5, 2.0)  # a node twice as slow or fast as its profile is another node: profile it again


def anchor_requests(rate_rps: float, seconds: float = ANCHOR_SECONDS) -> int:
    """Requests in an anchor of `seconds` of arrivals at `rate_rps`; 0 seconds turns the anchor off."""
    if seconds <= 0:
        return 0
    return int(min(MAX_ANCHOR_REQUESTS, max(MIN_ANCHOR_REQUESTS, math.ceil(rate_rps * seconds))))


def scaled_profile(profile: Profile, scale: float) -> Profile:
    """`profile` with the engine's measured times multiplied by `scale`: decode and mixed steps, prefill (its serving
    path, measured apart, is left as it is)."""
    out = copy.deepcopy(profile)
    for row in out.get("decode") or []:
        row["step_s"] = row["step_s"] * scale
        if "output_tokens_per_s" in row:
            row["output_tokens_per_s"] = row["output_tokens_per_s"] / scale
    for row in out.get("prefill") or []:
        row["prefill_tokens_per_s"] = row["prefill_tokens_per_s"] / scale
        if "ttft_s" in row:
            row["ttft_s"] = row["ttft_s"] * scale
    for row in out.get("mixed") or []:
        row["step_s"] = row["step_s"] * scale
    return out


def engine_model_s(model: StepTimeModel, decodes: int, chunks: Sequence[Sequence[int]]) -> float:
    """The engine's time for one step's work in `model`, without the serving path: a decode step of `decodes`,
    plus each (tokens, prompt length) chunk at that prompt's prefill rate, with the mixed-step factor the model has."""
    prompt_tokens = sum(int(n) for n, _ in chunks)
    prefill_s = sum(int(n) * float(model.prefill_s_per_token(float(length))) for n, length in chunks)
    return (model.engine_decode_step_s(decodes) + prefill_s) * model.mix_factor(decodes, prompt_tokens)


def engine_speed(steps: Sequence[Sequence], model: StepTimeModel) -> dict[str, Any] | None:
    """The recorded `steps` ([index, wall s, CPU s, decodes, chunks]) against `model`: their summed CPU and wall
    seconds, the model's seconds for the same work, and the ratios; None without steps."""
    if not steps:
        return None
    cpu = float(sum(s[2] for s in steps))
    wall = float(sum(s[1] for s in steps))
    modelled = float(sum(engine_model_s(model, int(s[3]), s[4]) for s in steps))
    if modelled <= 0:
        return None
    return {"steps": len(steps), "cpu_s": cpu, "wall_s": wall, "model_s": modelled, "cpu_ratio": cpu / modelled,
            "wall_ratio": wall / modelled}


def trace_model(profile: Profile, plan: Plan, trace: dict, token_budget: int, mixed_steps: bool) -> StepTimeModel:
    """The step-time model the simulator uses for `trace` (decode steps at its mean decode context)."""
    context = float(np.mean(trace["prompt_tokens"]) + np.mean(trace["output_tokens"]) / 2.0)
    return replica_config(profile, plan, context, token_budget, mixed_steps).step_model


def anchored_prediction(anchor: dict, run_steps: list | None, profile: Profile, plan: Plan, trace: dict,
                        measured: dict, token_budget: int, mixed_steps: bool = False) -> dict[str, Any]:
    """The anchor's and the run's engine speed against `profile`, and the run's `trace` predicted at each:
    {'speed_anchor': the anchor with its 'engine_speed', 'engine_speed_run', 'predicted_anchored',
    'error_pct_anchored', 'predicted_at_run_speed', 'error_pct_at_run_speed'}; a prediction is None without the
    step records it needs.

    The anchored prediction is made before the run. The one at the run's own speed is not a prediction: it is the
    model's error with the node's drift taken out (the run's engine CPU per step against the model, one number),
    so that a miss can be told apart into the node having moved and the model being wrong."""
    speed = engine_speed(anchor.get("steps") or [], trace_model(profile, plan, anchor["trace"], token_budget,
                                                                 mixed_steps))
    run = engine_speed(run_steps or [], trace_model(profile, plan, trace, token_budget, mixed_steps))
    out: dict[str, Any] = {"speed_anchor": {**anchor, "engine_speed": speed}, "engine_speed_run": run}
    for key, found in (("anchored", speed), ("at_run_speed", run)):
        out[f"predicted_{key}"] = out[f"error_pct_{key}"] = None
        if found is not None:
            lo, hi = SCALE_RANGE
            scale = min(hi, max(lo, found["cpu_ratio"]))
            sim = simulated_trace(scaled_profile(profile, scale), plan, trace["offsets_s"], trace["prompt_tokens"],
                                  trace["output_tokens"], token_budget, mixed_steps)
            out[f"predicted_{key}"] = summary_values(sim, plan.slo)
            out[f"error_pct_{key}"] = errors_pct(out[f"predicted_{key}"], measured)
    return out


def describe_anchor(report: dict) -> list[str]:
    anchor = report.get("speed_anchor") or {}
    speed, run = anchor.get("engine_speed"), report.get("engine_speed_run")
    lines = []
    if speed:
        lines.append(f"speed anchor ({len(anchor['trace']['offsets_s'])} requests of the workload just before the "
                     f"run, {speed['steps']} steps): the engine's CPU {speed['cpu_s']:.2f} s (wall {speed['wall_s']:.2f} "
                     f"s) against {speed['model_s']:.2f} s in the profile's model for the same steps: "
                     f"{_faster_or_slower(speed['cpu_ratio'])}; the anchored prediction scales the engine by "
                     f"{speed['cpu_ratio']:.3f}")
    if run:
        lines.append(f"during the run ({run['steps']} steps) the engine's CPU took {run['cpu_ratio']:.3f}x the model's "
                     f"time for the same steps (wall {run['wall_ratio']:.3f}x): {_faster_or_slower(run['cpu_ratio'])}")
    return lines


def _faster_or_slower(ratio: float) -> str:
    return f"{abs(ratio - 1) * 100:.1f}% {'slower' if ratio >= 1 else 'faster'} than its profile"
