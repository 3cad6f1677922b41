"""When each benchmark request is sent: gamma-distributed gaps whose mean rate is the requested rate.

Same process as vLLM's benchmark_serving: gap ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)), so the mean gap
is 1/rate whatever the burstiness. burstiness = 1 is a Poisson process; < 1 is burstier (clumps and lulls);
> 1 is steadier. rate = inf sends everything at once.
"""
from __future__ import annotations

import math

import numpy as np


def check_rate(request_rate: float, burstiness: float) -> None:
    if not (request_rate > 0):  # also rejects NaN
        raise ValueError(f"request_rate={request_rate}: allowed > 0 requests/s, or inf to send all at once")
    if not (burstiness > 0) or math.isinf(burstiness):
        raise ValueError(f"burstiness={burstiness}: allowed a finite number > 0 (1 = Poisson, <1 burstier, "
                         f">1 steadier)")


def arrival_gaps_s(num_requests: int, request_rate: float, burstiness: float = 1.0,
                   seed: int = 0) -> list[float]:
    """`num_requests` gaps in seconds; gap i is the wait after sending request i before sending request i+1."""
    if num_requests < 0:
        raise ValueError(f"num_requests={num_requests}: allowed >= 0")
    check_rate(request_rate, burstiness)
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    scale_s = 1.0 / (request_rate * burstiness)  # shape * scale = mean gap = 1/rate
    return rng.gamma(shape=burstiness, scale=scale_s, size=num_requests).tolist()


def arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> list[float]:
    """Send time of each request relative to the start: request 0 at 0, then the cumulative gaps."""
    gaps = arrival_gaps_s(num_requests, request_rate, burstiness, seed)
    offsets, now = [], 0.0
    for gap in gaps:
        offsets.append(now)
        now += gap
    return offsets
