"""Each figure of a validation against its fidelity target, and, where it misses, whose miss it is.

A plan is held to: TTFT p50, TPOT p50 and goodput within 10% of measured, p99s within 20%. The prediction made
before the run is the anchored one (the same trace at the profile's speed without an anchor). Where it misses, the
same trace predicted at the speed the engine really ran at (window by window when the run has its step records)
tells the two causes apart: within target there, the node's speed moved between the anchor and the run; outside it
too, the model is wrong.
"""
from __future__ import annotations

from typing import Mapping

TARGET_PCT = {"ttft_p50_ms": 10.0, "tpot_p50_ms": 10.0, "goodput_rps": 10.0, "ttft_p99_ms": 20.0,
              "tpot_p99_ms": 20.0}
LABELS = {"ttft_p50_ms": "TTFT p50", "tpot_p50_ms": "TPOT p50", "goodput_rps": "goodput", "ttft_p99_ms": "TTFT p99",
          "tpot_p99_ms": "TPOT p99"}
WITHIN, NODE_MOVED, MODEL = "within target", "the node moved", "the model"
OUTSIDE = "outside target"  # and no run speed to tell whose miss it is


def within_target(key: str, error_pct: float | None) -> bool | None:
    """Is `error_pct` (measured against predicted, in %) inside the target for figure `key`; None without one."""
    return None if error_pct is None else abs(error_pct) <= TARGET_PCT[key]


def verdicts(report: Mapping) -> dict[str, tuple[str, float, float | None]]:
    """Per target figure: (WITHIN, NODE_MOVED, MODEL or OUTSIDE, the prediction's error, the error at the run's own
    speed or None)."""
    before = report.get("error_pct_anchored") or report.get("error_pct_same_trace") or {}
    after = report.get("error_pct_at_run_speed_by_window") or report.get("error_pct_at_run_speed") or {}
    out = {}
    for key in TARGET_PCT:
        err = before.get(key)
        if err is None:
            continue
        at_run = after.get(key)
        if within_target(key, err):
            out[key] = (WITHIN, err, at_run)
        elif at_run is None:
            out[key] = (OUTSIDE, err, None)
        else:
            out[key] = (NODE_MOVED if within_target(key, at_run) else MODEL, err, at_run)
    return out


def describe_verdicts(report: Mapping) -> list[str]:
    """One line: each figure's verdict, for the report."""
    found = verdicts(report)
    if not found:
        return []
    which = "anchored" if report.get("error_pct_anchored") else "same trace"
    parts = []
    for key, (verdict, err, at_run) in found.items():
        text = f"{LABELS[key]} {err:+.1f}%: {verdict}"
        if verdict != WITHIN and at_run is not None:
            text += f" ({at_run:+.1f}% at the run's own speed)"
        parts.append(text)
    return [f"against the targets (p50s and goodput within 10%, p99s within 20%; prediction: {which}): "
            + "; ".join(parts)]
