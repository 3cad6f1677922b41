"""What one simulated fleet run did: per-request timestamps, and the latency, goodput and utilisation they imply.

Latencies are defined as in vLLM's benchmark_serving and judged by the one SLO rule (pernode.slo), so a simulated
attainment and a measured one count the same requests as good.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pernode.slo import SLO


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
    preemptions: np.ndarray  # per request: times the KV cache ran out and it was preempted to be recomputed
    num_events: int = 0
    schedules: list | None = None  # per replica, when recorded: (step start s, [(request, new tokens), ...])
    steps: np.ndarray | None = None  # per replica: engine steps run (a run of identical decode steps counts each)

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
            "preemptions": int(self.preemptions.sum()),
        }
