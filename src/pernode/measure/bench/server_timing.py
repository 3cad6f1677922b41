"""The server's own view of its requests' first tokens, read from its Prometheus `/metrics`: the sums and counts of
`pernode:time_to_first_token_seconds` (from the handler having the request to its first token) and
`pernode:request_queue_time_seconds` (to its first scheduled step). Two readings around a run give the run's means;
set beside the client's TTFT they split it into the way in and out, the queue and the engine's first steps.
"""
from __future__ import annotations

import re

import httpx

_HISTOGRAMS = {"ttft": "pernode:time_to_first_token_seconds", "queue": "pernode:request_queue_time_seconds"}


def parse_server_timing(text: str) -> dict[str, float]:
    """{'ttft_sum', 'ttft_count', 'queue_sum', 'queue_count'} from a Prometheus exposition (summed over labels)."""
    out = {f"{k}_{part}": 0.0 for k in _HISTOGRAMS for part in ("sum", "count")}
    for key, name in _HISTOGRAMS.items():
        for part in ("sum", "count"):
            pattern = rf"^{re.escape(name)}_{part}(?:{{[^}}]*}})?\s+(\S+)$"
            for m in re.finditer(pattern, text, re.MULTILINE):
                out[f"{key}_{part}"] += float(m.group(1))
    return out


_STEP_COUNTERS = {"steps": "pernode:engine_steps_total", "step_wall_s": "pernode:engine_step_seconds_total",
                  "step_cpu_s": "pernode:engine_step_cpu_seconds_total"}


def parse_engine_steps(text: str) -> dict[str, float] | None:
    """{'steps', 'step_wall_s', 'step_cpu_s'}: the engine's steps so far and their wall and CPU seconds, from a
    Prometheus exposition; None when the server does not export them (an older `pernode serve`)."""
    out = {}
    for key, name in _STEP_COUNTERS.items():
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", text, re.MULTILINE)
        if m is None:
            return None
        out[key] = float(m.group(1))
    return out


def scrape_server_timing(base_url: str, timeout_s: float = 10.0) -> dict[str, float] | None:
    """The server's TTFT and queue-time histogram sums and counts now; None when /metrics does not answer."""
    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    # the engine's step clock too, where the server exports it (jobs/validate/engine_busy.py)
    return {**parse_server_timing(resp.text), **(parse_engine_steps(resp.text) or {})}


def mean_s(before: dict, after: dict, key: str) -> float | None:
    """The mean of histogram `key` ('ttft' or 'queue') over what it observed between two readings."""
    n = after[f"{key}_count"] - before[f"{key}_count"]
    return (after[f"{key}_sum"] - before[f"{key}_sum"]) / n if n > 0 else None


NO_STEPS_AFTER = 2**62  # asks /metrics/steps for its next index alone


def step_records(base_url: str, after: int = NO_STEPS_AFTER, replica_header: str | None = None,
                 timeout_s: float = 30.0) -> dict | None:
    """The server's GET /metrics/steps: {'next': the index its next step will have, 'steps': [[index, wall s, CPU s,
    decodes, [[chunk tokens, prompt length], ...], from idle, gap s], ...] after step `after`, and with
    `replica_header` 'replica': that response header (which replica of a fleet answered)}; None when it has no such
    route (not a `pernode serve`, or an older one)."""
    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/metrics/steps", params={"after": after}, timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    body = resp.json()
    if not isinstance(body, dict) or not isinstance(body.get("steps"), list):
        return None
    return {**body, "replica": resp.headers.get(replica_header)} if replica_header else body
