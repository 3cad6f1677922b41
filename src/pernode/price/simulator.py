"""Discrete-event simulation of N continuously batching replicas behind a load balancer, and of a plain FIFO queue.

Each replica runs the vLLM v1 scheduling rule (Kwon et al., arXiv 2309.06180; chunked prefill as in Sarathi-Serve,
Agrawal et al., arXiv 2403.02310): every step, each running decode gets one token, then prompts fill what is left
of the token budget, continuing a partly prefilled prompt first and admitting waiting requests in arrival order while
the batch and the KV cache have room. A step lasts StepTimeModel.step_s. A request reserves its prompt + output
tokens of KV when admitted, so nothing is ever preempted (vLLM preempts instead; reserving is the safe side).

Speed: a replica whose step only decodes, with no admissible request waiting, repeats the same step until its
earliest decode finishes. We schedule that whole run as one event, and cut it short at the next step boundary if
an admissible request arrives; decode progress is one per-replica counter, and each running request waits in a heap
keyed by the counter value at which it finishes. Events scale with requests, not with tokens.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from pernode.slo import SLO
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace

POLICIES = ("least_outstanding", "round_robin")


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica can do: its step times, its batch cap, its KV tokens and its per-step token budget."""

    step_model: StepTimeModel
    max_batch: int
    kv_max_tokens: int
    token_budget: int = 2048  # vLLM's default max_num_batched_tokens with chunked prefill

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch = {self.max_batch!r}: must be >= 1")
        if self.kv_max_tokens < 1:
            raise ValueError(f"kv_max_tokens = {self.kv_max_tokens!r}: must be >= 1")
        if self.token_budget < 2:
            raise ValueError(f"token_budget = {self.token_budget!r}: must be >= 2 tokens per step")
        if self.max_batch >= self.token_budget:
            raise ValueError(f"max_batch = {self.max_batch} must be < token_budget = {self.token_budget}: "
                             f"decodes take one budget token each and prompts need at least one left")


@dataclass
class FleetSimResult:
    """Per-request timestamps from one simulated run, and the fleet's busy time."""

    arrival_s: np.ndarray
    admit_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    replica: np.ndarray
    num_replicas: int
    max_batch: int
    busy_s: np.ndarray  # per replica: time spent running steps
    slot_seconds: np.ndarray  # per replica: integral of running requests over time
    in_system_seconds: float  # integral over time of requests in the fleet (waiting + running)
    num_events: int = 0

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.size)

    @property
    def span_s(self) -> float:
        """From the first arrival to the last finish: the window every time-average uses."""
        return float(self.finish_s.max() - self.arrival_s.min())

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> np.ndarray:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> np.ndarray:
        """(E2E - TTFT) / (output - 1); NaN for one-token outputs, which have no time between tokens."""
        steps = self.output_tokens - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(steps > 0, (self.finish_s - self.first_token_s) / np.maximum(steps, 1), np.nan)

    @property
    def queue_wait_s(self) -> np.ndarray:
        return self.admit_s - self.arrival_s

    def percentiles_s(self, metric: str, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        values = {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2e": self.e2e_s, "queue_wait": self.queue_wait_s}
        if metric not in values:
            raise ValueError(f"metric = {metric!r}: one of {', '.join(values)}")
        v = values[metric]
        if np.all(np.isnan(v)):
            return {f"p{q:g}": math.nan for q in qs}
        return {f"p{q:g}": float(x) for q, x in zip(qs, np.nanpercentile(v, qs))}

    def met(self, slo: SLO) -> np.ndarray:
        return slo.met(self.ttft_s, self.tpot_s, self.e2e_s)

    def attainment(self, slo: SLO) -> float:
        """Fraction of requests meeting every SLO that is set."""
        return float(np.mean(self.met(slo)))

    def goodput_rps(self, slo: SLO) -> float:
        """Requests meeting the SLO per second of the run (first arrival to last finish)."""
        return float(np.sum(self.met(slo))) / self.span_s

    def goodput_output_tokens_per_s(self, slo: SLO) -> float:
        return float(np.sum(self.output_tokens[self.met(slo)])) / self.span_s

    def output_tokens_per_s(self) -> float:
        return float(self.output_tokens.sum()) / self.span_s

    def busy_fraction(self) -> float:
        """Mean over replicas of the fraction of the run spent stepping (any batch size counts as busy)."""
        return float(np.mean(self.busy_s)) / self.span_s

    def slot_occupancy(self) -> float:
        """Mean running requests per replica over the run, as a fraction of max_batch: the queueing utilisation."""
        return float(np.mean(self.slot_seconds)) / (self.max_batch * self.span_s)

    def mean_in_system(self) -> float:
        """Time-averaged requests in the fleet, from the simulator's own running count (Little's L)."""
        return self.in_system_seconds / self.span_s

    def summary(self, slo: SLO) -> dict:
        return {
            "num_requests": self.num_requests,
            "num_replicas": self.num_replicas,
            "ttft_s": self.percentiles_s("ttft"),
            "tpot_s": self.percentiles_s("tpot"),
            "e2e_s": self.percentiles_s("e2e"),
            "attainment": self.attainment(slo),
            "goodput_rps": self.goodput_rps(slo),
            "goodput_output_tokens_per_s": self.goodput_output_tokens_per_s(slo),
            "output_tokens_per_s": self.output_tokens_per_s(),
            "busy_fraction": self.busy_fraction(),
            "slot_occupancy": self.slot_occupancy(),
        }


class _Replica:
    __slots__ = ("waiting", "prefilling", "decode_heap", "counter", "num_running", "kv_used", "busy",
                 "run_start", "run_step_s", "run_steps", "run_chunks", "run_decodes", "run_running",
                 "version", "busy_s", "slot_seconds")

    def __init__(self) -> None:
        self.waiting: deque[int] = deque()
        self.prefilling: deque[list[int]] = deque()  # [request id, prompt tokens still to compute], FIFO
        self.decode_heap: list[tuple[int, int]] = []  # (counter value at which it finishes, request id)
        self.counter = 0  # decode tokens each running request has received since the replica started
        self.num_running = 0  # admitted and unfinished: prefilling + decoding
        self.kv_used = 0
        self.busy = False
        self.run_start = 0.0
        self.run_step_s = 0.0
        self.run_steps = 0
        self.run_chunks: list[tuple[list[int], int]] = []
        self.run_decodes = 0
        self.run_running = 0
        self.version = 0
        self.busy_s = 0.0
        self.slot_seconds = 0.0


def simulate_fleet(trace: RequestTrace, replica: ReplicaConfig, num_replicas: int,
                   policy: str = "least_outstanding") -> FleetSimResult:
    """Run `trace` through `num_replicas` identical replicas until every request finishes."""
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
        raise ValueError(f"num_replicas = {num_replicas!r}: must be a whole number >= 1")
    if policy not in POLICIES:
        raise ValueError(f"policy = {policy!r}: one of {', '.join(POLICIES)}")
    n = len(trace)
    if n and (np.any(np.diff(trace.arrival_s) < 0) or not np.all(np.isfinite(trace.arrival_s))):
        raise ValueError("trace.arrival_s must be finite and sorted ascending (requests in arrival order)")
    if n and (trace.prompt_tokens.min() < 1 or trace.output_tokens.min() < 1):
        raise ValueError(f"trace lengths must be >= 1 token; smallest prompt {trace.prompt_tokens.min()}, "
                         f"smallest output {trace.output_tokens.min()}")
    prompt = trace.prompt_tokens.tolist()
    output = trace.output_tokens.tolist()
    need = (trace.prompt_tokens + trace.output_tokens).tolist()
    too_big = int(np.sum(trace.prompt_tokens + trace.output_tokens > replica.kv_max_tokens))
    if too_big:
        raise ValueError(f"{too_big} requests need more KV than one replica holds "
                         f"(prompt + output > kv_max_tokens = {replica.kv_max_tokens}); shorten the lengths "
                         f"or use a node with more KV memory")
    arrivals = trace.arrival_s.tolist()
    s_per_token = np.asarray(replica.step_model.prefill_s_per_token(trace.prompt_tokens.astype(np.float64)))
    spt = s_per_token.tolist()
    max_batch, kv_max, budget_total = replica.max_batch, replica.kv_max_tokens, replica.token_budget
    decode_s = [replica.step_model.decode_step_s(b) for b in range(max_batch + 1)]

    admit = [math.nan] * n
    first = [math.nan] * n
    finish = [math.nan] * n
    where = [0] * n
    reps = [_Replica() for _ in range(num_replicas)]
    outstanding = [0] * num_replicas
    events: list[tuple[float, int, int]] = []  # (end time, replica, version): the end of a replica's run
    in_system = 0
    in_system_seconds = 0.0
    last_t = arrivals[0] if n else 0.0
    rr = 0
    num_events = 0

    def start_run(r: int, rep: _Replica, t: float) -> None:
        b = len(rep.decode_heap)
        budget = budget_total - b
        chunks: list[tuple[list[int], int]] = []
        prefill_s = 0.0
        for entry in rep.prefilling:  # a partly computed prompt goes first, as vLLM keeps running requests first
            if budget <= 0:
                break
            take = entry[1] if entry[1] < budget else budget
            chunks.append((entry, take))
            budget -= take
            prefill_s += take * spt[entry[0]]
        while rep.waiting and budget > 0 and rep.num_running < max_batch:
            rid = rep.waiting[0]
            if rep.kv_used + need[rid] > kv_max:
                break  # first come first served: the head blocks, as vLLM's FCFS policy does
            rep.waiting.popleft()
            rep.num_running += 1
            rep.kv_used += need[rid]
            admit[rid] = t
            entry = [rid, prompt[rid]]
            rep.prefilling.append(entry)
            take = entry[1] if entry[1] < budget else budget
            chunks.append((entry, take))
            budget -= take
            prefill_s += take * spt[rid]
        if chunks:
            step_s, steps = decode_s[b] + prefill_s, 1
        elif b:
            step_s, steps = decode_s[b], rep.decode_heap[0][0] - rep.counter
        else:
            rep.busy = False
            return
        rep.busy = True
        rep.run_start, rep.run_step_s, rep.run_steps = t, step_s, steps
        rep.run_chunks, rep.run_decodes, rep.run_running = chunks, b, rep.num_running
        rep.version += 1
        heapq.heappush(events, (t + step_s * steps, r, rep.version))

    i = 0
    while i < n or events:
        if i < n and (not events or arrivals[i] <= events[0][0]):
            t = arrivals[i]
            rid = i
            i += 1
            if policy == "round_robin":
                r = rid % num_replicas
            else:
                low = min(outstanding)
                r = rr
                while outstanding[r] != low:  # the first least-loaded replica after the last pick spreads ties
                    r = r + 1 if r + 1 < num_replicas else 0
                rr = r + 1 if r + 1 < num_replicas else 0
            rep = reps[r]
            in_system_seconds += in_system * (t - last_t)
            last_t = t
            in_system += 1
            outstanding[r] += 1
            where[rid] = r
            if not rep.busy:
                rep.waiting.append(rid)
                start_run(r, rep, t)
                continue
            if (not rep.run_chunks and not rep.waiting and rep.num_running < max_batch
                    and rep.kv_used + need[rid] <= kv_max):
                # It could join now: end the decode-only run at the first step boundary at or after t.
                done = math.ceil((t - rep.run_start) / rep.run_step_s - 1e-9)
                done = max(done, 1)
                if done < rep.run_steps:
                    rep.run_steps = done
                    rep.version += 1
                    heapq.heappush(events, (rep.run_start + rep.run_step_s * done, r, rep.version))
            rep.waiting.append(rid)
            continue

        t, r, version = heapq.heappop(events)
        rep = reps[r]
        if version != rep.version:
            continue  # superseded by a shortened run
        num_events += 1
        duration = rep.run_step_s * rep.run_steps
        rep.busy_s += duration
        rep.slot_seconds += rep.run_running * duration
        in_system_seconds += in_system * (t - last_t)
        last_t = t
        if rep.run_decodes:
            rep.counter += rep.run_steps
            heap = rep.decode_heap
            while heap and heap[0][0] <= rep.counter:
                _, rid = heapq.heappop(heap)
                finish[rid] = t
                rep.num_running -= 1
                rep.kv_used -= need[rid]
                outstanding[r] -= 1
                in_system -= 1
        for entry, take in rep.run_chunks:
            entry[1] -= take
            if entry[1] == 0:
                rid = entry[0]
                rep.prefilling.popleft()  # chunks are taken in FIFO order, so the finished ones lead
                first[rid] = t  # the step that computes a prompt's last token samples its first output token
                if output[rid] == 1:
                    finish[rid] = t
                    rep.num_running -= 1
                    rep.kv_used -= need[rid]
                    outstanding[r] -= 1
                    in_system -= 1
                else:
                    heapq.heappush(rep.decode_heap, (rep.counter + output[rid] - 1, rid))
        start_run(r, rep, t)

    finish_a = np.asarray(finish)
    if n and np.isnan(finish_a).any():
        raise RuntimeError(f"simulator bug: {int(np.isnan(finish_a).sum())} requests never finished")
    return FleetSimResult(
        arrival_s=trace.arrival_s.copy(), admit_s=np.asarray(admit), first_token_s=np.asarray(first),
        finish_s=finish_a, prompt_tokens=trace.prompt_tokens.copy(), output_tokens=trace.output_tokens.copy(),
        replica=np.asarray(where), num_replicas=num_replicas, max_batch=max_batch,
        busy_s=np.asarray([rp.busy_s for rp in reps]), slot_seconds=np.asarray([rp.slot_seconds for rp in reps]),
        in_system_seconds=in_system_seconds, num_events=num_events)


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
