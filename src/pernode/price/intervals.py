"""Predictions as distributions: the same fleet simulated on several seeded traces, each latency percentile and
goodput reported as the range it took over the seeds. A measured run of the same size falls inside that range
about as often as one more seed would (with k seeds, (k - 1) / (k + 1) of the time)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from pernode.price.fleet_result import FleetSimResult
from pernode.price.simulator import simulate_fleet
from pernode.price.replica import ReplicaConfig
from pernode.price.workload import RequestTrace
from pernode.slo import SLO

LATENCIES = ("ttft", "tpot", "e2e")
DEFAULT_INTERVAL_SEEDS = 5


def summary_values(res: FleetSimResult, slo: SLO) -> dict[str, float]:
    """The figures an interval is taken over, keyed as validate's report keys them (latencies in ms)."""
    out = {"goodput_rps": res.goodput_rps(slo), "attainment": res.attainment(slo)}
    for m in LATENCIES:
        for q, v in res.percentiles_s(m).items():
            out[f"{m}_{q}_ms"] = v * 1000.0
    return out


def seed_intervals(make_trace: Callable[[int], RequestTrace], replica: ReplicaConfig, num_replicas: int,
                   policy: str, slo: SLO, seeds: list[int],
                   known: dict[int, FleetSimResult] | None = None) -> dict:
    """{key: [low, high]} over one simulation per seed, plus the seeds used. `known` holds runs already made."""
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    values = []
    for seed in seeds:
        res = (known or {}).get(seed) or simulate_fleet(make_trace(seed), replica, num_replicas, policy)
        values.append(summary_values(res, slo))
    out: dict = {"seeds": list(seeds)}
    for key in values[0]:
        col = np.array([v[key] for v in values], dtype=np.float64)
        col = col[np.isfinite(col)]
        out[key] = [float(col.min()), float(col.max())] if col.size else None
    return out


def where_in_interval(measured: float | None, interval: list | None) -> str | None:
    """'inside', 'above' or 'below' the interval; None when either side is missing."""
    if measured is None or interval is None or not np.isfinite(measured):
        return None
    lo, hi = interval
    return "below" if measured < lo else "above" if measured > hi else "inside"
