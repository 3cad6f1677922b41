"""The serving path's costs from paired (direct, HTTP) rounds: per level the median paired differences, the curve
of serving CPU per decode step a plan adds (never falling, interpolated between stream counts), the line through it
(step_s + c * token_s), the engine ratio, the per-request term and the idle start. How the rounds are timed, and
why these are the quantities, is in serving_path_streams.py; Agrawal et al., arXiv 2405.05465 (vidur) for adding a
replica's non-model overheads per batch.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pernode.measure.profile.paired_difference import paired_difference


@dataclass(frozen=True)
class StreamTiming:
    """Mean TTFT and TPOT of the c streams of one round, and CPU time. Direct half: `cpu_s` the in-process engine
    thread's, `server_cpu_s` the server's serving threads' meanwhile (their background work while idle). HTTP
    half: `cpu_s` the server's serving threads' (every thread but the engine's), `engine_cpu_s` the server's
    engine thread's. Where the server's engine thread cannot be told apart (`engine_cpu_s` None), `cpu_s` and
    `server_cpu_s` are the whole server process's. `wall_s` is the half's length."""

    ttft_s: float
    tpot_s: float
    cpu_s: float | None = None
    wall_s: float | None = None
    server_cpu_s: float | None = None
    engine_cpu_s: float | None = None
    server_first_steps_s: float | None = None  # HTTP half: the server's mean first scheduled step -> first token


def added_cpu_s(direct: StreamTiming, http: StreamTiming) -> float | None:
    """CPU seconds of serving work on the server's cores in one round: the serving threads' CPU time in the HTTP
    half less their idle background rate over that half. Measured on the serving threads themselves, it does not
    depend on the in-process engine costing the same as the server's (on one core every such second delays the
    engine's steps, by the core or by the GIL). Without a named engine thread: the whole process's CPU time less
    the background, less what the same requests cost the in-process engine (the older, biased estimate)."""
    if None in (direct.cpu_s, direct.wall_s, direct.server_cpu_s, http.cpu_s, http.wall_s) or direct.wall_s <= 0:
        return None
    background = direct.server_cpu_s / direct.wall_s * http.wall_s
    if http.engine_cpu_s is not None:
        return http.cpu_s - background
    return http.cpu_s - background - direct.cpu_s


def per_step_curve(streams: Sequence[int], added_s: Sequence[float]) -> list[dict]:
    """The measured levels as the curve a plan interpolates: per stream count, the added seconds per decode step,
    never negative and never falling as streams grow (a bigger batch streams more, never less; a dip between
    levels is noise). Through Ray the cost per stream falls as streams grow, which no line through the origin
    follows (docs/fleet.md)."""
    order = np.argsort(np.asarray(streams, dtype=np.float64), kind="stable")
    c = [int(streams[i]) for i in order]
    v = np.maximum.accumulate(np.maximum(0.0, np.asarray([added_s[i] for i in order], dtype=np.float64)))
    return [{"streams": k, "added_s": float(x)} for k, x in zip(c, v)]


def engine_ratio(by_level: dict[int, list]) -> dict | None:
    """How much more CPU the serving process's engine thread spends than the in-process engine on the same work
    (the same prompt length, output length and stream count, in alternating halves), pooled over every round: its
    caches and the GIL are shared with the serving threads, the in-process engine's are not. The median of the
    per-round ratios with its order-statistics interval, and what a plan could scale the profile's engine step
    times by (`planned`: the median when the interval excludes 1, else 1). The section plans it only with
    `plan_engine_ratio`: two runs on a loaded box each excluded 1 but on opposite sides (0.947 and 1.028), so the
    interval of one run does not yet bound the ratio. None without the server's engine thread's CPU time."""
    ratios = [h.engine_cpu_s / d.cpu_s for pairs in by_level.values() for d, h in pairs
              if h.engine_cpu_s is not None and d.cpu_s]
    if len(ratios) < 3:
        return None
    d = paired_difference([1.0] * len(ratios), ratios)  # ratio - 1
    planned = 1.0 if d.below_noise else 1.0 + d.median_s
    per_level = {c: statistics.median(h.engine_cpu_s / dd.cpu_s for dd, h in pairs)
                 for c, pairs in sorted(by_level.items()) if all(h.engine_cpu_s is not None and dd.cpu_s
                                                                 for dd, h in pairs)}
    return {"median": 1.0 + d.median_s, "interval": [1.0 + d.interval_s[0], 1.0 + d.interval_s[1]],
            "coverage": d.coverage, "rounds": d.pairs, "planned": planned,
            "per_level_median": {str(c): v for c, v in per_level.items()},
            "note": (f"the serving process's engine thread ran {1.0 + d.median_s:.3f}x the in-process engine's CPU "
                     f"time for the same work (median of {d.pairs} rounds, {100 * d.coverage:.0f}% interval "
                     f"[{1.0 + d.interval_s[0]:.3f}, {1.0 + d.interval_s[1]:.3f}]); "
                     + ("the interval holds 1" if d.below_noise
                        else f"plannable as x {planned:.3f} on the profile's engine step times"))}


@dataclass(frozen=True)
class StreamCosts:
    """The fitted serving path: per step, per running stream, and how the fit went."""

    step_s: float
    token_s: float
    raw_intercept_s: float
    raw_slope_s: float
    note: str


def fit_stream_costs(streams: Sequence[int], added_tpot_s: Sequence[float]) -> StreamCosts:
    """added TPOT(c) = step_s + c * token_s by least squares over (c, added TPOT) points, never negative.

    A negative intercept (noise, or a path cheaper per step than the engine alone) is dropped and the slope
    refitted through the origin; a negative slope is planned as 0 with the mean as the fixed part."""
    c = np.asarray(streams, dtype=np.float64)
    d = np.asarray(added_tpot_s, dtype=np.float64)
    if c.size != d.size or c.size == 0:
        raise ValueError(f"fit_stream_costs: {c.size} stream counts and {d.size} differences; need the same, >= 1")
    if np.any(c < 1):
        raise ValueError(f"streams={list(streams)}: each must be >= 1")
    if np.unique(c).size == 1:
        slope, intercept = float(np.mean(d)) / float(c[0]), 0.0  # one level: all of it per stream
    else:
        slope, intercept = (float(v) for v in np.polyfit(c, d, 1))
    if intercept >= 0 and slope >= 0:
        return StreamCosts(intercept, slope, intercept, slope, "line through the per-level medians")
    if intercept < 0:
        through_origin = float(np.dot(c, d) / np.dot(c, c))
        if through_origin >= 0:
            return StreamCosts(0.0, through_origin, intercept, slope,
                               f"intercept {intercept * 1e3:+.2f} ms < 0 dropped; slope refitted through the origin")
    fixed = max(0.0, float(np.mean(d)))
    return StreamCosts(fixed, 0.0, intercept, slope,
                       f"slope {slope * 1e3:+.2f} ms per stream <= 0: planned as 0, the mean as a fixed part")


def idle_start_s(by_level: dict[int, list], input_len: int, warm_prefill: Sequence[dict]) -> dict | None:
    """What a prompt's first step costs on an engine that was idle (200 ms between rounds) beyond the profile's
    prefill, which times prompts back to back: the median over one-stream rounds of the direct TTFT less the
    profile's TTFT at that prompt length (interpolated). Both halves of a pair start idle, so the paired
    difference leaves this out; a plan adds it to a step that starts on an idle replica. Only meaningful when the
    prefill points were measured in the same run (not with --serving-path-into)."""
    rows = [r for r in warm_prefill if isinstance(r, dict) and "prompt_len" in r and "ttft_s" in r]
    if 1 not in by_level or not rows:
        return None
    rows.sort(key=lambda r: r["prompt_len"])
    warm = float(np.interp(input_len, [r["prompt_len"] for r in rows], [r["ttft_s"] for r in rows]))
    d = paired_difference([warm] * len(by_level[1]), [direct.ttft_s for direct, _ in by_level[1]])
    out = d.to_dict()
    out["warm_prefill_s"] = warm
    out["note"] = d.describe("first step on an idle engine beyond the profile's warm prefill")
    return out


def summarize_streams(by_level: dict[int, list], path: str, input_len: int, output_len: int,
                      load: tuple[float, float], layout: dict, warm_prefill: Sequence[dict] | None = None,
                      plan_engine_ratio: bool = False) -> dict:
    """The profile's serving_path section from paired (direct, http) round timings at each stream count; with
    the profile's prefill points measured in the same run, also `idle_start_s` (see idle_start_s)."""
    levels = []
    for c, pairs in sorted(by_level.items()):
        ttft = paired_difference([d.ttft_s for d, _ in pairs], [h.ttft_s for _, h in pairs])
        tpot = paired_difference([d.tpot_s for d, _ in pairs], [h.tpot_s for _, h in pairs])
        level = {"streams": c, "rounds": len(pairs), "added_ttft": ttft.to_dict(), "added_tpot": tpot.to_dict(),
                 "direct_tpot_p50_s": statistics.median(d.tpot_s for d, _ in pairs),
                 "http_tpot_p50_s": statistics.median(h.tpot_s for _, h in pairs),
                 "timings": [[dataclasses.asdict(d), dataclasses.asdict(h)] for d, h in pairs],  # (direct, http)
                 "notes": [ttft.describe(f"{c} stream(s), per request (wall)"),
                           tpot.describe(f"{c} stream(s), per token of each stream (wall)")]}
        extra = [added_cpu_s(d, h) for d, h in pairs]
        if extra and None not in extra:  # per decode step: each step of a round streams one token of each stream
            per_step = sorted(x / output_len for x in extra)
            # the engine's own CPU per step in the same rounds: set beside the profile's decode step at batch c,
            # it shows how much the machine's load inflated CPU time
            level["direct_cpu_per_step_p50_s"] = statistics.median(d.cpu_s / output_len for d, _ in pairs)
            if all(h.engine_cpu_s is not None for _, h in pairs):  # the server's own engine thread, same rounds
                level["server_engine_cpu_per_step_p50_s"] = statistics.median(h.engine_cpu_s / output_len
                                                                              for _, h in pairs)
            level["added_cpu_per_step"] = paired_difference([0.0] * len(per_step), per_step).to_dict()
            level["notes"].append(paired_difference([0.0] * len(per_step), per_step).describe(
                f"{c} stream(s), serving CPU per decode step on the replica's core"))
        levels.append(level)
    by_cpu = all("added_cpu_per_step" in lv for lv in levels)
    wall = fit_stream_costs([lv["streams"] for lv in levels], [lv["added_tpot"]["median_s"] for lv in levels])
    fit = (fit_stream_costs([lv["streams"] for lv in levels], [lv["added_cpu_per_step"]["median_s"] for lv in levels])
           if by_cpu else wall)
    one = next((lv for lv in levels if lv["streams"] == 1), levels[0])
    request = one["added_ttft"]
    one_pairs = by_level[one["streams"]]
    if all(h.server_first_steps_s is not None for _, h in one_pairs):
        # The way in and out measured on the path itself: the client's TTFT less the server's own first steps
        # (from its first scheduled step to its first token). Unlike the paired TTFT difference it holds no
        # prefill, so the engine's noise stays out of it.
        way = [h.ttft_s - h.server_first_steps_s for _, h in one_pairs]
        request = paired_difference([0.0] * len(way), way).to_dict()
        one["way_in_and_out"] = request
        one["notes"].append(paired_difference([0.0] * len(way), way).describe(
            f"{one['streams']} stream(s), per request: client TTFT less the server's first steps"))
    notes = [n for lv in levels for n in lv["notes"]]
    for what, f in ((("serving CPU on the replica's core", fit), ("wall TPOT", wall)) if by_cpu
                    else (("wall TPOT", wall),)):
        notes.append(f"from {what}: per step {f.step_s * 1e3:.2f} ms + {f.token_s * 1e3:.2f} ms per running stream "
                     f"({f.note}; raw line {f.raw_intercept_s * 1e3:+.2f} ms {f.raw_slope_s * 1e3:+.2f} ms x streams)")
    ratio = engine_ratio(by_level)
    scale = ratio["planned"] if ratio and plan_engine_ratio else 1.0
    planned_key = "added_cpu_per_step" if by_cpu else "added_tpot"
    curve = per_step_curve([lv["streams"] for lv in levels], [lv[planned_key]["median_s"] for lv in levels])
    at = {row["streams"]: row["added_s"] for row in curve}
    for lv in levels:  # does the planned curve, added to the engine's own TPOT, give the TPOT seen over HTTP?
        predicted = lv["direct_tpot_p50_s"] * scale + at[lv["streams"]]
        lv["predicted_http_tpot_s"] = predicted
        notes.append(f"{lv['streams']} stream(s): HTTP TPOT {lv['http_tpot_p50_s'] * 1e3:.2f} ms, direct "
                     f"{lv['direct_tpot_p50_s'] * 1e3:.2f} ms" + (f" x {scale:.3f}" if scale != 1.0 else "")
                     + f" + the planned path = {predicted * 1e3:.2f} ms "
                     f"({(lv['http_tpot_p50_s'] / predicted - 1) * 100:+.1f}%)")
    notes.append("planned: " + ("the serving threads' CPU time per level (CPU time barely depends on the machine's "
                                "load; the wall fit is kept for comparison)" if by_cpu else "the wall TPOT per level")
                 + ", interpolated between the measured stream counts and carried on by the last segment's slope; "
                 "the line is its summary")
    if ratio is not None:
        notes.append(ratio["note"] + ("; planned" if scale != 1.0 else "; not planned"))
    idle = idle_start_s(by_level, input_len, warm_prefill) if warm_prefill else None
    if idle is not None:
        notes.append(idle["note"])
    return {
        "path": path,
        "idle_start_s": idle["planned_s"] if idle else 0.0,
        "idle_start": idle,
        "request_s": max(0.0, request["median_s"]),
        "token_s": fit.token_s,
        "step_s": fit.step_s,
        "per_step_curve": curve,
        "engine_ratio": scale,
        "engine_ratio_measured": ratio,
        "request": request,
        "token": levels[-1]["added_tpot"],
        "below_noise": bool(request["below_noise"]) or all(lv["added_tpot"]["below_noise"] for lv in levels),
        "streams": levels,
        "fit": {"from": "cpu" if by_cpu else "wall", "step_s": fit.step_s, "token_s": fit.token_s,
                "raw_intercept_s": fit.raw_intercept_s, "raw_slope_s": fit.raw_slope_s, "note": fit.note},
        "wall_fit": {"step_s": wall.step_s, "token_s": wall.token_s, "raw_intercept_s": wall.raw_intercept_s,
                     "raw_slope_s": wall.raw_slope_s, "note": wall.note},
        "pairs": sum(lv["rounds"] for lv in levels),
        "requests": sum(lv["rounds"] * lv["streams"] for lv in levels),
        "load_avg_1m": [round(load[0], 2), round(load[1], 2)],
        "input_len": str(input_len), "output_len": str(output_len),
        "layout": layout,
        "notes": notes,
        "method": "paired rounds at several concurrent streams: c prompts at once straight into an in-process "
                  "engine and over HTTP through the path, alternating which goes first; per level the median "
                  "of the paired differences with an order-statistics interval; per-step and per-stream costs "
                  "from a line through the levels' medians",
    }
