"""Request by request: each request's simulated TTFT, TPOT and end-to-end latency against the client's own.

Two runs can share their percentiles while their requests do not (and the other way round). Putting each request
beside its own simulated twin, on the same trace at the run's own engine speed, tells whether the simulator
reproduces what happened to each request or only the distribution's shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pernode.measure.bench.bench_result import BenchResult
from pernode.price.fleet_result import FleetSimResult

METRICS = ("ttft_s", "tpot_s", "e2e_s")


def measured_requests(result: BenchResult) -> dict[str, list[float | None]]:
    """The client's latencies per request, in the order sent (None where a request failed or has no TPOT)."""
    return {m: [getattr(row, m) if row.success else None for row in result.per_request] for m in METRICS}


def request_agreement(sim: FleetSimResult, measured: dict[str, list[float | None]]) -> dict[str, Any] | None:
    """Measured minus simulated, request by request: for each metric the number of requests compared, the median
    and the 10th/90th percentiles of the difference in ms, and the median of |difference| / measured in percent.
    None when the run and the simulation do not hold the same requests."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        got = measured.get(metric)
        if got is None or len(got) != sim.num_requests:
            return None
        m = np.asarray([np.nan if x is None else x for x in got], dtype=np.float64)
        p = getattr(sim, metric)
        both = np.isfinite(m) & np.isfinite(p) & (m > 0)
        if not both.any():
            out[metric] = None
            continue
        diff_ms = (m[both] - p[both]) * 1e3
        out[metric] = {"requests": int(both.sum()), "median_ms": float(np.median(diff_ms)),
                       "p10_ms": float(np.percentile(diff_ms, 10)), "p90_ms": float(np.percentile(diff_ms, 90)),
                       "median_abs_pct": float(np.median(np.abs(diff_ms) / (m[both] * 1e3)) * 100.0)}
    return out


def describe_agreement(agreement: dict[str, Any] | None, which: str) -> list[str]:
    if not agreement:
        return []
    parts = []
    for metric, label in zip(METRICS, ("TTFT", "TPOT", "E2E")):
        a = agreement.get(metric)
        if a:
            parts.append(f"{label} {a['median_ms']:+.1f} ms (p10 {a['p10_ms']:+.1f}, p90 {a['p90_ms']:+.1f}; "
                         f"median |error| {a['median_abs_pct']:.1f}%)")
    return [f"request by request {which}, measured minus simulated: " + "; ".join(parts)] if parts else []
