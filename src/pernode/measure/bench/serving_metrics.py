"""Serving metrics from per-request timelines: TTFT, ITL, TPOT, E2E latency, throughput and goodput.

The definitions are vLLM's `benchmarks/benchmark_serving.py`, so numbers from `pernode bench serve` can sit beside
numbers from vLLM's tool and mean the same thing:

- TTFT   = time of the first streamed content chunk - time the request was sent.
- ITL    = the gaps between consecutive content chunks (pooled over all requests).
- E2E    = time of the last content chunk - time the request was sent (`e2el` in vLLM's names).
- TPOT   = (E2E - TTFT) / (output_tokens - 1), per request, only for requests with more than one output token.
- Throughputs divide by the benchmark duration (first send to last completion, measured by the caller).
- Goodput = requests per second that meet every given SLO (`pernode.slo.SLO.met`, the planner's rule); a request
  with at most one output token has no TPOT and cannot miss it.

Failed requests are counted and listed with their errors; they never vanish from the denominator of "how many did
we send", but (as in vLLM) they add no tokens and no latencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from pernode.slo import SLO

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestTimeline:
    """What one request did, as absolute `time.perf_counter()` readings in seconds."""

    index: int
    send_time_s: float
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each content chunk
    prompt_tokens: int = 0  # the server's usage.prompt_tokens if given, else the dataset's estimate
    output_tokens: int | None = None  # the server's usage.completion_tokens; None -> count the chunks
    success: bool = True
    error: str = ""
    requested_output_tokens: int | None = None  # max_tokens asked for; lets the report show early stops

    @property
    def num_output_tokens(self) -> int:
        # Servers may pack several tokens into one chunk (or send empty ones), so usage is the better count.
        if self.output_tokens is not None:
            return int(self.output_tokens)
        return len(self.chunk_times_s)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.send_time_s

    @property
    def e2e_s(self) -> float:
        return self.chunk_times_s[-1] - self.send_time_s

    @property
    def itl_s(self) -> list[float]:
        c = self.chunk_times_s
        return [c[i + 1] - c[i] for i in range(len(c) - 1)]

    @property
    def tpot_s(self) -> float | None:
        n = self.num_output_tokens
        if n <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)


def parse_slo(text: str | None) -> SLO | None:
    """The optional `slo` setting (`ttft_ms=500,tpot_ms=50,e2e_ms=10000`) as an SLO; empty or None -> None."""
    return SLO.parse(text) if text and text.strip() else None


def percentile_key(p: float, name: str) -> str:
    """vLLM's key of the p-th percentile of `name` in ms: p99 -> `p99_ttft_ms`, p99.9 -> `p99_9_ttft_ms`."""
    return f"p{p:g}_{name}_ms".replace(".", "_")


def summarize_ms(values_s: Sequence[float], name: str,
                 percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict[str, float | None]:
    """mean/median/std/pNN of a list of seconds, reported in milliseconds under vLLM's key names.

    Percentiles use numpy's default linear interpolation (as vLLM does); std is the population std.
    An empty list gives None rather than vLLM's 0, so "no data" cannot be read as "instant".
    """
    out: dict[str, float | None] = {}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    empty = arr.size == 0
    out[f"mean_{name}_ms"] = None if empty else float(arr.mean())
    out[f"median_{name}_ms"] = None if empty else float(np.median(arr))
    out[f"std_{name}_ms"] = None if empty else float(arr.std())
    for p in percentiles:
        out[percentile_key(p, name)] = None if empty else float(np.percentile(arr, p))
    return out


def compute_serving_metrics(timelines: Sequence[RequestTimeline], duration_s: float,
                            slo: SLO | None = None,
                            percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict:
    """All serving metrics of one benchmark run, as a JSON-able dict.

    Keys: num_requests, completed, failed, failed_requests [{index, error}], duration_s, total_input_tokens,
    total_output_tokens, request_throughput_per_s, output_throughput_tok_s, total_token_throughput_tok_s, slo,
    good_requests, request_goodput_per_s (None without an SLO), and for each of ttft, tpot, itl, e2el:
    mean_X_ms, median_X_ms, std_X_ms, pNN_X_ms (vLLM's names; p99.9 -> p99_9).

    `duration_s` is the wall time of the whole run (vLLM: from just before the first send to after the last
    response). A request marked successful but without any content chunk has no TTFT; it is counted as failed.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s = {duration_s}: must be > 0 seconds (the benchmark's wall time)")
    percentiles = tuple(percentiles)
    ok: list[RequestTimeline] = []
    failed: list[dict] = []
    for t in timelines:
        if t.success and not t.chunk_times_s:
            failed.append({"index": t.index, "error": t.error or "stream ended without any content chunk"})
        elif t.success:
            ok.append(t)
        else:
            failed.append({"index": t.index, "error": t.error or "unknown error"})
    failed.sort(key=lambda f: f["index"])

    total_input = sum(t.prompt_tokens for t in ok)
    total_output = sum(t.num_output_tokens for t in ok)
    ttfts = [t.ttft_s for t in ok]
    tpots = [t.tpot_s for t in ok if t.tpot_s is not None]
    itls = [gap for t in ok for gap in t.itl_s]
    e2es = [t.e2e_s for t in ok]
    num_good = None
    if slo is not None:
        # The planner's rule (pernode.slo); a one-token request has no TPOT (NaN) and cannot miss it.
        tpot_or_nan = [math.nan if t.tpot_s is None else t.tpot_s for t in ok]
        num_good = int(slo.met(ttfts, tpot_or_nan, e2es).sum())

    metrics: dict = {
        "num_requests": len(timelines),
        "completed": len(ok),
        "failed": len(failed),
        "failed_requests": failed,
        "duration_s": float(duration_s),
        "total_input_tokens": int(total_input),
        "total_output_tokens": int(total_output),
        "request_throughput_per_s": len(ok) / duration_s,
        "output_throughput_tok_s": total_output / duration_s,
        "total_token_throughput_tok_s": (total_input + total_output) / duration_s,
        "slo": {} if slo is None else {k: ms for k, ms in slo.to_dict().items() if ms is not None},
        "good_requests": num_good,
        "request_goodput_per_s": None if num_good is None else num_good / duration_s,
    }
    metrics.update(summarize_ms(ttfts, "ttft", percentiles))
    metrics.update(summarize_ms(tpots, "tpot", percentiles))
    metrics.update(summarize_ms(itls, "itl", percentiles))
    metrics.update(summarize_ms(e2es, "e2el", percentiles))
    return metrics


def per_request_records(timelines: Sequence[RequestTimeline]) -> list[dict]:
    """One JSON-able row per request (relative times in seconds), for CDFs and for reading failures in context."""
    rows = []
    for t in sorted(timelines, key=lambda t: t.index):
        has_chunks = bool(t.chunk_times_s)
        good = t.success and has_chunks
        rows.append({
            "index": t.index,
            "success": good,
            "error": "" if good else (t.error or "stream ended without any content chunk"),
            "prompt_tokens": t.prompt_tokens,
            "output_tokens": t.num_output_tokens if good else 0,
            "requested_output_tokens": t.requested_output_tokens,
            "ttft_s": t.ttft_s if good else None,
            "tpot_s": t.tpot_s if good else None,
            "e2e_s": t.e2e_s if good else None,
            "itl_s": t.itl_s if good else [],
        })
    return rows
