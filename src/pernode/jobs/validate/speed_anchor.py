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
path's part of the model), the wall seconds are shown beside them. Prompt work is the exception: a prompt step of
150-800 ms also carries the path's work for requests that arrive meanwhile, which no per-step term covers, so its
ratio is taken on the step's wall time less the path's per-step part (`prefill_wall_ratio`, the one predicted with).

The anchor sends `anchor_requests` requests of the workload's shape at its rate, with a seed of its own (none is
scored), before the run. Its ratio s is the node's speed of the moment; the anchored prediction is the run's
same-trace prediction with the engine's decode steps and prefill times scaled by their own ratios (a shared host
slows memory-bound decodes and compute-bound prefills by different amounts). The plain prediction stays beside it,
and the run's own ratio says whether the speed held: the same trace predicted at that ratio, or at each 10 s window's
own (price/node_speed.py), takes the node's drift out of the error and leaves the model's (after the fact, not a
prediction). Through Ray with several replicas the records are those of the replica that answered first
(jobs/validate/run.py asks until the same one answers again).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np

from pernode.jobs.validate.compare import errors_pct, replica_config, simulated_trace
from pernode.jobs.validate.request_agreement import request_agreement
from pernode.measure.profile.profile_schema import Profile
from pernode.price.intervals import summary_values
from pernode.price.node_speed import NodeSpeed
from pernode.price.planner import Plan
from pernode.price.step_time import StepTimeModel

ANCHOR_SECONDS = 20.0  # of arrivals at the workload's rate: long enough to reach its steady batch
# A dozen long-prompt requests are a sample of the workload too small to stand for it: the RAG grid's 12-14-request
# anchors held 5-10% shorter decode contexts than their runs; with 40 they agree within 2% (docs/fleet.md).
MIN_ANCHOR_REQUESTS = 40
MAX_ANCHOR_REQUESTS = 200
SCALE_RANGE = (0.5, 2.0)  # a node twice as slow or fast as its profile is another node: profile it again
WINDOW_S = 10.0  # the run's speed window by window: the node moved 6-10% between windows this long (docs/fleet.md)
MIN_WINDOW_STEPS = 10  # of a kind in a window, else the run's own ratio for that kind


def anchor_requests(rate_rps: float, seconds: float = ANCHOR_SECONDS) -> int:
    """Requests in an anchor of `seconds` of arrivals at `rate_rps`; 0 seconds turns the anchor off."""
    if seconds <= 0:
        return 0
    return int(min(MAX_ANCHOR_REQUESTS, max(MIN_ANCHOR_REQUESTS, math.ceil(rate_rps * seconds))))


def scaled_profile(profile: Profile, decode_scale: float, prefill_scale: float | None = None) -> Profile:
    """`profile` with the engine's measured decode steps multiplied by `decode_scale` and its prefill times by
    `prefill_scale` (default: the same); mixed steps, decodes and a chunk at once, by their mean. Its serving path,
    measured apart, is left as it is."""
    prefill_scale = decode_scale if prefill_scale is None else prefill_scale
    out = copy.deepcopy(profile)
    for row in out.get("decode") or []:
        row["step_s"] = row["step_s"] * decode_scale
        if "output_tokens_per_s" in row:
            row["output_tokens_per_s"] = row["output_tokens_per_s"] / decode_scale
    for row in out.get("prefill") or []:
        row["prefill_tokens_per_s"] = row["prefill_tokens_per_s"] / prefill_scale
        if "ttft_s" in row:
            row["ttft_s"] = row["ttft_s"] * prefill_scale
    for row in out.get("mixed") or []:
        row["step_s"] = row["step_s"] * (decode_scale + prefill_scale) / 2.0
    return out


def _parts_s(model: StepTimeModel, step: Sequence) -> tuple[float, float]:
    """(decode part, prompt part) of the engine's time for one recorded step in `model`, without the serving path:
    a decode step of its decodes; each (tokens, prompt length) chunk at that prompt's prefill rate, with the
    mixed-step factor the model has, and the idle start the simulator adds to a step that wakes an idle engine."""
    decodes, chunks = int(step[3]), step[4]
    from_idle = bool(step[5]) if len(step) > 5 else False
    prompt_tokens = sum(int(n) for n, _ in chunks)
    decode_s = model.engine_decode_step_s(decodes)
    prefill_s = sum(int(n) * float(model.prefill_s_per_token(float(length))) for n, length in chunks)
    mix = model.mix_factor(decodes, prompt_tokens)
    idle_s = model.idle_start_s if from_idle else 0.0
    return decode_s * mix, prefill_s * mix + idle_s


def engine_model_s(model: StepTimeModel, step: Sequence) -> float:
    """The engine's time in `model` for one recorded step ([index, wall s, CPU s, decodes, chunks, from idle])."""
    return sum(_parts_s(model, step))


def engine_speed(steps: Sequence[Sequence], model: StepTimeModel) -> dict[str, Any] | None:
    """The recorded `steps` against `model`: their summed CPU and wall seconds, the model's seconds for the same
    work, the ratios, and the CPU ratio apart for decodes and prompts (memory-bound decode and compute-bound prefill
    drift apart on a shared host): `decode_ratio` over the steps without a prompt chunk, `prefill_ratio` over the
    prompt part of the others once their decodes are taken at the decode ratio, and `prefill_wall_ratio` the same
    on their wall time less the serving path's per-step part (never below the CPU's). None without steps."""
    if not steps:
        return None
    parts = [_parts_s(model, s) for s in steps]
    cpu = float(sum(s[2] for s in steps))
    wall = float(sum(s[1] for s in steps))
    modelled = float(sum(d + p for d, p in parts))
    if modelled <= 0:
        return None
    ratio = cpu / modelled
    pure = [(s[2], d) for s, (d, p) in zip(steps, parts) if p == 0.0]
    decode_ratio = sum(c for c, _ in pure) / sum(d for _, d in pure) if pure and sum(d for _, d in pure) > 0 else ratio
    mixed = [(s, d, p) for s, (d, p) in zip(steps, parts) if p > 0.0]
    prompt_s = sum(p for _, _, p in mixed)
    decodes_s = decode_ratio * sum(d for _, d, _ in mixed)
    prefill_ratio = (sum(s[2] for s, _, _ in mixed) - decodes_s) / prompt_s if prompt_s > 0 else ratio
    # The prompt work as it runs on the replica's core: its wall time less the serving path's per-step work for
    # the streams in the step. A decode step's wall beyond its CPU is that per-step work; a prompt step of
    # 150-800 ms also holds the path's work for the requests that arrive meanwhile, 1-3% of it (docs/fleet.md).
    prompt_wall_s = sum(max(s[1], s[2]) - model.serving_decode_s(int(s[3])) for s, _, _ in mixed) - decodes_s
    prefill_wall_ratio = max(prefill_ratio, prompt_wall_s / prompt_s) if prompt_s > 0 else prefill_ratio
    # between two steps of a busy engine: the loop's own work (requests in, outputs out, metrics), not in the model
    between = [s[6] for s in steps if len(s) > 6 and not s[5]]
    return {"steps": len(steps), "cpu_s": cpu, "wall_s": wall, "model_s": modelled, "cpu_ratio": ratio,
            "wall_ratio": wall / modelled, "decode_ratio": decode_ratio, "prefill_ratio": prefill_ratio,
            "prefill_wall_ratio": prefill_wall_ratio,
            "between_steps_ms": float(np.mean(between)) * 1e3 if between else None}


def step_start_times(steps: Sequence[Sequence], first_s: float) -> list[float]:
    """When each recorded step started, in seconds on the trace's clock: the first at `first_s` (the wait before it
    is the engine's idle time before the run, not part of it), each later one its gap after the one before ended."""
    starts, t = [], first_s
    for i, step in enumerate(steps):
        if i:
            t += float(step[6]) if len(step) > 6 else 0.0
        starts.append(t)
        t += float(step[1])
    return starts


def speed_by_window(steps: Sequence[Sequence], model: StepTimeModel, first_s: float, window_s: float = WINDOW_S,
                    run: dict[str, Any] | None = None) -> NodeSpeed | None:
    """The engine's speed against `model` in each `window_s` of the run (from the steps that started in it), as the
    simulator's NodeSpeed. A window with fewer than MIN_WINDOW_STEPS steps of a kind (decode-only steps, steps with
    a prompt chunk) takes the whole run's ratio for that kind (`run`: engine_speed of `steps`, when already known).
    None without steps."""
    run = run or engine_speed(steps, model)
    if run is None:
        return None
    windows: list[list] = [[]]
    for step, start in zip(steps, step_start_times(steps, first_s)):
        k = int((start - first_s) // window_s)
        windows.extend([] for _ in range(k + 1 - len(windows)))
        windows[k].append(step)
    lo, hi = SCALE_RANGE
    edges, decode, prefill = [], [], []
    for k, inside in enumerate(windows):
        found = engine_speed(inside, model)
        with_prompt = sum(1 for s in inside if s[4])
        d = found["decode_ratio"] if found and len(inside) - with_prompt >= MIN_WINDOW_STEPS else run["decode_ratio"]
        p = found["prefill_wall_ratio"] if found and with_prompt >= MIN_WINDOW_STEPS else run["prefill_wall_ratio"]
        edges.append(0.0 if k == 0 else first_s + k * window_s)  # the first window's speed also holds before it
        decode.append(min(hi, max(lo, d)))
        prefill.append(min(hi, max(lo, p)))
    return NodeSpeed(tuple(edges), tuple(decode), tuple(prefill))


def trace_model(profile: Profile, plan: Plan, trace: dict, token_budget: int, mixed_steps: bool) -> StepTimeModel:
    """The step-time model the simulator uses for `trace` (decode steps at its mean decode context)."""
    context = float(np.mean(trace["prompt_tokens"]) + np.mean(trace["output_tokens"]) / 2.0)
    return replica_config(profile, plan, context, token_budget, mixed_steps).step_model


def anchored_prediction(anchor: dict, run_steps: list | None, profile: Profile, plan: Plan, trace: dict,
                        measured: dict, token_budget: int, mixed_steps: bool = False,
                        requests: dict | None = None) -> dict[str, Any]:
    """The anchor's and the run's engine speed against `profile`, and the run's `trace` predicted at each:
    {'speed_anchor': the anchor with its 'engine_speed', 'engine_speed_run', 'predicted_anchored',
    'error_pct_anchored', 'predicted_at_run_speed', 'error_pct_at_run_speed'}; a prediction is None without the
    step records it needs. With the client's per-request latencies (`requests`, request_agreement.measured_requests)
    each prediction is also compared request by request ('request_agreement_anchored', ..._at_run_speed).

    The anchored prediction is made before the run. The ones at the run's own speed are not predictions: they are
    the model's error with the node's drift taken out (the run's engine CPU per step against the model: one number
    for the run, and 'at_run_speed_by_window', each WINDOW_S of the run at its own, 'engine_speed_run_windows'), so
    that a miss can be told apart into the node having moved and the model being wrong."""
    speed = engine_speed(anchor.get("steps") or [], trace_model(profile, plan, anchor["trace"], token_budget,
                                                                 mixed_steps))
    model = trace_model(profile, plan, trace, token_budget, mixed_steps)
    run = engine_speed(run_steps or [], model)
    windows = speed_by_window(run_steps or [], model, float(trace["offsets_s"][0]) + model.serving_request_s, run=run)
    out: dict[str, Any] = {"speed_anchor": {**anchor, "engine_speed": speed}, "engine_speed_run": run,
                           "engine_speed_run_windows": None if windows is None else {
                               "window_s": WINDOW_S, "start_s": windows.start_s, "decode_ratio": windows.decode,
                               "prefill_ratio": windows.prefill}}
    lo, hi = SCALE_RANGE
    for key, found in (("anchored", speed), ("at_run_speed", run), ("at_run_speed_by_window", windows)):
        out[f"predicted_{key}"] = out[f"error_pct_{key}"] = None
        if found is None:
            continue
        if isinstance(found, NodeSpeed):
            at_profile, node_speed = profile, found
        else:
            decode, prefill = (min(hi, max(lo, found[k])) for k in ("decode_ratio", "prefill_wall_ratio"))
            at_profile, node_speed = scaled_profile(profile, decode, prefill), None
        sim = simulated_trace(at_profile, plan, trace["offsets_s"], trace["prompt_tokens"], trace["output_tokens"],
                              token_budget, mixed_steps, node_speed)
        out[f"predicted_{key}"] = summary_values(sim, plan.slo)
        out[f"error_pct_{key}"] = errors_pct(out[f"predicted_{key}"], measured)
        if requests:
            out[f"request_agreement_{key}"] = request_agreement(sim, requests)
    return out


def describe_anchor(report: dict) -> list[str]:
    anchor = report.get("speed_anchor") or {}
    speed, run = anchor.get("engine_speed"), report.get("engine_speed_run")
    lines = []
    if speed:
        lines.append(f"speed anchor ({len(anchor['trace']['offsets_s'])} requests of the workload just before the "
                     f"run, {speed['steps']} steps): the engine's CPU {speed['cpu_s']:.2f} s (wall {speed['wall_s']:.2f} "
                     f"s) against {speed['model_s']:.2f} s in the profile's model for the same steps: "
                     f"{_faster_or_slower(speed['cpu_ratio'])}; the anchored prediction scales decode steps by "
                     f"{speed['decode_ratio']:.3f} and prefill by {_prefill(speed)}")
    if run:
        lines.append(f"during the run ({run['steps']} steps) the engine's CPU took {run['cpu_ratio']:.3f}x the model's "
                     f"time for the same steps (wall {run['wall_ratio']:.3f}x; decodes {run['decode_ratio']:.3f}x, "
                     f"prompts {_prefill(run)}): {_faster_or_slower(run['cpu_ratio'])}"
                     + (f"; {run['between_steps_ms']:.2f} ms a step between busy steps"
                        if run.get("between_steps_ms") is not None else ""))
    windows = report.get("engine_speed_run_windows")
    if windows and len(windows["decode_ratio"]) > 1:
        lines.append(f"window by window ({len(windows['decode_ratio'])} of {windows['window_s']:g} s) decodes ran "
                     f"{min(windows['decode_ratio']):.3f}x-{max(windows['decode_ratio']):.3f}x the model and prompts "
                     f"{min(windows['prefill_ratio']):.3f}x-{max(windows['prefill_ratio']):.3f}x")
    return lines


def _prefill(speed: dict) -> str:
    """The prompt ratio a prediction uses (on the replica's core, wall) and, when it differs, the CPU's alone."""
    wall, cpu = speed.get("prefill_wall_ratio", speed["prefill_ratio"]), speed["prefill_ratio"]
    return f"{wall:.3f}" + (f" (CPU alone {cpu:.3f})" if abs(wall - cpu) >= 5e-4 else "")


def _faster_or_slower(ratio: float) -> str:
    return f"{abs(ratio - 1) * 100:.1f}% {'slower' if ratio >= 1 else 'faster'} than its profile"
