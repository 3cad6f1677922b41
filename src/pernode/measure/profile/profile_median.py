"""One profile from several of the same engine taken at different times: each point's median time.

On a shared machine a step time follows the neighbours' load of that minute. Profiling every variant once per
round, over several rounds, and keeping each point's median puts every variant through the same drift, so the
load cannot rank them; the rates derived from a time (tokens/s, GB/s, FLOP/s, fraction of peak) are rescaled to
the median time and the roofline side (`bound`, set by arithmetic intensity) stays as it was.
"""
from __future__ import annotations

import copy
import statistics
from typing import Sequence

from pernode.measure.profile.profile_schema import Profile, validate_profile

_DECODE_RATES = ("output_tokens_per_s", "achieved_gbs", "achieved_flops", "fraction_of_peak")
_PREFILL_RATES = ("prefill_tokens_per_s", "achieved_gbs", "achieved_flops", "fraction_of_peak")


def _median_points(runs: Sequence[list[dict]], key: tuple[str, ...], time_field: str,
                   rates: tuple[str, ...]) -> list[dict]:
    by_key: dict[tuple, list[dict]] = {}
    for points in runs:
        for p in points:
            by_key.setdefault(tuple(p[k] for k in key), []).append(p)
    out = []
    for p in runs[0]:  # the first run's points and order; a point a later run missed: median of those that had it
        same = by_key[tuple(p[k] for k in key)]
        t = statistics.median(q[time_field] for q in same)
        scale = p[time_field] / t
        merged = {**p, time_field: t, "rounds": len(same), f"{time_field}_rounds": [q[time_field] for q in same]}
        for r in rates:
            if isinstance(p.get(r), (int, float)):
                merged[r] = p[r] * scale
        out.append(merged)
    return out


def median_profile(profiles: Sequence[Profile]) -> Profile:
    """A profile whose decode and prefill times are each point's median over `profiles` (same engine and sweep).
    Each point records how many runs measured it and their times (`step_s_rounds`, `ttft_s_rounds`)."""
    if not profiles:
        raise ValueError("profiles=[]: need at least one profile to take medians over")
    if len(profiles) == 1:
        return profiles[0]
    names = {(p["model"]["name"], p["model"]["dtype"], p["kv_cache"]["max_tokens"]) for p in profiles}
    if len(names) > 1:
        raise ValueError(f"profiles of different engines cannot be combined: {sorted(names)}")
    out = copy.deepcopy(profiles[0])
    out["decode"] = _median_points([p["decode"] for p in profiles], ("batch_size", "context_len"), "step_s",
                                   _DECODE_RATES)
    out["prefill"] = _median_points([p["prefill"] for p in profiles], ("prompt_len",), "ttft_s", _PREFILL_RATES)
    out["memory_high_water_bytes"] = max((p.get("memory_high_water_bytes") or 0) for p in profiles) or None
    return validate_profile(out)
