"""Where a run's time to first token goes, measured and predicted side by side, so that a TTFT error points at its
part: the way in and out (HTTP, the proxy, the client), the wait for admission, or the engine's first step(s).

The server counts from the moment its handler has the request (`pernode:request_queue_time_seconds`: to the
request's first scheduled step; `pernode:time_to_first_token_seconds`: to its first token), so from the means of
its histograms over the run (scraped from /metrics before and after) and the client's TTFT:

    client TTFT = way in and out (client TTFT - server TTFT) + queue (server) + first step(s) (server TTFT - queue)

The simulator's same-trace run splits its prediction the same way: `serving_request_s` is its way in and out, the
admission wait beyond it its queue, and first token - admission its first step(s). Through Ray with several
replicas /metrics answers from one replica; the split is then that replica's.
"""
from __future__ import annotations

import math

import numpy as np

from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.bench.server_timing import mean_s, parse_server_timing, scrape_server_timing
from pernode.price.fleet_result import FleetSimResult

__all__ = ["describe_ttft_parts", "parse_server_timing", "scrape_server_timing", "ttft_parts"]


def _mean_ms(before: dict, after: dict, key: str) -> float | None:
    v = mean_s(before, after, key)
    return None if v is None else v * 1000.0


def ttft_parts(before: dict | None, after: dict | None, result: BenchResult | None, predicted: FleetSimResult | None,
               serving_request_s: float = 0.0) -> dict:
    """Mean TTFT in its three parts (ms), measured (needs both scrapes) and predicted (needs the same-trace run)."""
    client = [r.ttft_s for r in result.per_request if r.success and r.ttft_s is not None] if result else []
    out: dict = {"measured": None, "predicted": None}
    if before is not None and after is not None and client:
        server_ttft, queue = _mean_ms(before, after, "ttft"), _mean_ms(before, after, "queue")
        client_ms = float(np.mean(client)) * 1000.0
        if server_ttft is not None and queue is not None:
            out["measured"] = {"ttft_ms": client_ms, "way_in_and_out_ms": client_ms - server_ttft,
                               "queue_ms": queue, "first_steps_ms": server_ttft - queue,
                               "server_requests": int(after["ttft_count"] - before["ttft_count"])}
    if predicted is not None and len(predicted.arrival_s):
        wait = predicted.queue_wait_s - serving_request_s
        first = predicted.first_token_s - predicted.admit_s
        ok = np.isfinite(wait) & np.isfinite(first)
        if ok.any():
            out["predicted"] = {"ttft_ms": float(np.mean(predicted.ttft_s[ok])) * 1000.0,
                                "way_in_and_out_ms": serving_request_s * 1000.0,
                                "queue_ms": float(np.mean(wait[ok])) * 1000.0,
                                "first_steps_ms": float(np.mean(first[ok])) * 1000.0}
    return out


def describe_ttft_parts(parts: dict) -> list[str]:
    """One line per part: measured / predicted (difference), for the report."""
    m, p = parts.get("measured"), parts.get("predicted")
    if not m or not p:
        return []
    names = (("ttft_ms", "TTFT (mean)"), ("way_in_and_out_ms", "way in and out (HTTP, proxy, client)"),
             ("queue_ms", "queue to admission"), ("first_steps_ms", "admission to first token"))
    lines = []
    for key, label in names:
        a, b = m[key], p[key]
        diff = "" if not (math.isfinite(a) and math.isfinite(b)) else f" ({a - b:+.1f} ms)"
        lines.append(f"{label}: measured {a:.1f} ms / predicted {b:.1f} ms{diff}")
    return lines
