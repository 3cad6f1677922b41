"""Discrete-event simulation of N continuously batching replicas behind a load balancer, and of a plain FIFO queue.

The loop is vidur's (Agrawal et al., arXiv 2405.05465): take the next event (an arrival, or the end of a replica's
run of steps), let the router or the replica handle it, and queue the run end it returns. Each replica runs the
engine's own scheduler (replica.py); the routers are the small classes below, registered by name.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from pernode.price.fleet_result import FleetSimResult
from pernode.price.replica import Replica, ReplicaConfig, RequestBook
from pernode.price.workload import RequestTrace

__all__ = ["POLICIES", "ROUTERS", "FleetSimResult", "ReplicaConfig", "simulate_fifo_servers", "simulate_fleet"]


class RoundRobin:
    """Request i goes to replica i mod N, whatever the load."""

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas

    def route(self, rid: int, outstanding: list[int]) -> int:
        return rid % self.num_replicas


class LeastOutstanding:
    """The replica with the fewest unfinished requests; ties go to the first such replica after the last pick,
    which spreads them."""

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas
        self.next = 0

    def route(self, rid: int, outstanding: list[int]) -> int:
        low = min(outstanding)
        r = self.next
        while outstanding[r] != low:
            r = r + 1 if r + 1 < self.num_replicas else 0
        self.next = r + 1 if r + 1 < self.num_replicas else 0
        return r


ROUTERS = {"least_outstanding": LeastOutstanding, "round_robin": RoundRobin}
POLICIES = tuple(ROUTERS)


def _check_inputs(trace: RequestTrace, replica: ReplicaConfig, num_replicas: int, policy: str) -> None:
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas!r}: must be a whole number >= 1")
    if policy not in ROUTERS:
        raise ValueError(f"policy={policy!r}: one of {', '.join(ROUTERS)}")
    if len(trace) and (np.any(np.diff(trace.arrival_s) < 0) or not np.all(np.isfinite(trace.arrival_s))):
        raise ValueError("trace.arrival_s must be finite and sorted ascending (requests in arrival order)")
    if len(trace) and (trace.prompt_tokens.min() < 1 or trace.output_tokens.min() < 1):
        raise ValueError(f"trace lengths must be >= 1 token; smallest prompt {trace.prompt_tokens.min()}, "
                         f"smallest output {trace.output_tokens.min()}")
    if trace.prompt_token_ids is not None and (
            len(trace.prompt_token_ids) != len(trace)
            or any(len(ids) != p for ids, p in zip(trace.prompt_token_ids, trace.prompt_tokens.tolist()))):
        raise ValueError("trace.prompt_token_ids: one list per request, as long as its prompt_tokens")
    # A request alone on a replica must fit, or preempting it would only start it over. Its last sampled token
    # is never computed, so it holds KV for prompt + output - 1 tokens, in whole blocks.
    held = trace.prompt_tokens + trace.output_tokens - 1
    too_big = int(np.sum(-(-held // replica.block_size) > replica.num_blocks))
    if too_big:
        raise ValueError(f"kv_max_tokens={replica.kv_max_tokens}: {too_big} requests need more KV than one replica "
                         f"holds (prompt + output); shorten the lengths or use a node with more KV memory")


def simulate_fleet(trace: RequestTrace, replica: ReplicaConfig, num_replicas: int,
                   policy: str = "least_outstanding", record_schedule: bool = False) -> FleetSimResult:
    """Run `trace` through `num_replicas` identical replicas until every request finishes.

    A request reaches its replica's engine `step_model.serving_request_s` after it arrives (the serving path);
    latencies count from the arrival. `record_schedule` keeps every replica's step-by-step schedule in the result.
    """
    _check_inputs(trace, replica, num_replicas, policy)
    n = len(trace)
    book = RequestBook(trace, replica.step_model)
    schedules = [[] for _ in range(num_replicas)] if record_schedule else None
    replicas = [Replica(replica, book, schedules[r] if schedules else None) for r in range(num_replicas)]
    router = ROUTERS[policy](num_replicas)
    outstanding = [0] * num_replicas  # per replica: routed and unfinished
    events: list[tuple[float, int, int]] = []  # (end of a replica's run, replica, run version)
    arrivals = (trace.arrival_s + replica.step_model.serving_request_s).tolist()
    in_system, in_system_seconds, last_t = 0, 0.0, (arrivals[0] if n else 0.0)
    i = num_events = 0
    while i < n or events:
        if i < n and (not events or arrivals[i] <= events[0][0]):
            t, rid, i = arrivals[i], i, i + 1
            r = router.route(rid, outstanding)
            book.replica[rid] = r
            outstanding[r] += 1
            in_system_seconds += in_system * (t - last_t)
            in_system, last_t = in_system + 1, t
            end = replicas[r].arrive(rid, t)
        else:
            t, r, version = heapq.heappop(events)
            if version != replicas[r].version:
                continue  # superseded by a shortened run
            num_events += 1
            in_system_seconds += in_system * (t - last_t)
            last_t = t
            finished = replicas[r].end_run(t)
            outstanding[r] -= finished
            in_system -= finished
            end = replicas[r].start_run(t)
        if end is not None:
            heapq.heappush(events, (end, r, replicas[r].version))

    finish_s = np.asarray(book.finish_s)
    if n and np.isnan(finish_s).any():
        raise RuntimeError(f"simulator bug: {int(np.isnan(finish_s).sum())} requests never finished")
    return FleetSimResult(
        arrival_s=trace.arrival_s.copy(), admit_s=np.asarray(book.admit_s),
        first_token_s=np.asarray(book.first_token_s), finish_s=finish_s, prompt_tokens=trace.prompt_tokens.copy(),
        output_tokens=trace.output_tokens.copy(), replica=np.asarray(book.replica), num_replicas=num_replicas,
        max_batch=replica.max_batch, busy_s=np.asarray([rp.busy_s for rp in replicas]),
        slot_seconds=np.asarray([rp.slot_seconds for rp in replicas]), in_system_seconds=in_system_seconds,
        preemptions=np.asarray(book.preemptions), num_events=num_events, schedules=schedules,
        steps=np.asarray([rp.steps for rp in replicas]))


@dataclass(frozen=True)
class FifoQueueResult:
    """Per-customer times of a first-come-first-served queue with identical servers."""

    arrival_s: np.ndarray
    start_s: np.ndarray
    finish_s: np.ndarray

    @property
    def wait_s(self) -> np.ndarray:
        return self.start_s - self.arrival_s

    @property
    def sojourn_s(self) -> np.ndarray:
        return self.finish_s - self.arrival_s


def simulate_fifo_servers(arrival_s: np.ndarray, service_s: np.ndarray, num_servers: int) -> FifoQueueResult:
    """G/G/c FIFO: each customer, in arrival order, takes the server that frees first.

    With Poisson arrivals and exponential service this is M/M/c, the check against the closed forms. It is kept
    apart from the replica simulator because a server here holds one customer, not a batch.
    """
    a = np.asarray(arrival_s, dtype=np.float64)
    s = np.asarray(service_s, dtype=np.float64)
    if a.shape != s.shape or a.ndim != 1:
        raise ValueError(f"arrival_s and service_s must be 1-D and the same length, got {a.shape} and {s.shape}")
    if isinstance(num_servers, bool) or not isinstance(num_servers, (int, np.integer)) or num_servers < 1:
        raise ValueError(f"num_servers = {num_servers!r}: must be a whole number >= 1")
    if a.size and np.any(np.diff(a) < 0):
        raise ValueError("arrival_s must be sorted ascending (FIFO order is arrival order)")
    free_at = [0.0] * int(num_servers)  # already a valid heap
    start = np.empty_like(a)
    heappushpop = heapq.heapreplace
    for k, (t, dur) in enumerate(zip(a.tolist(), s.tolist())):
        begin = free_at[0] if free_at[0] > t else t
        start[k] = begin
        heappushpop(free_at, begin + dur)
    return FifoQueueResult(a, start, start + s)
