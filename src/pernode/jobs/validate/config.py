"""What one `fleet validate` run does: the plan to check, how much of its workload to send, where to send it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pernode.jobs.validate.speed_anchor import ANCHOR_SECONDS
from pernode.price.workload import LengthDist

DEFAULT_DURATION_S = 120.0  # enough arrivals for a p99 at the rates a 2-core box takes
MIN_PROMPTS = 300


@dataclass(frozen=True)
class FleetPlacement:
    """How the fleet `validate` brings up sits on the local Ray; None picks the default (see `FleetSpec`)."""

    port: int | None = None  # default: a free one
    num_cpus_per_replica: float | None = None
    threads_per_replica: int | None = None
    max_ongoing_requests: int | None = None
    cpusets: tuple[str, ...] | None = None  # one CPU list per replica: each replica on cores of its own
    client_cpuset: str | None = None  # the load generator and Ray's other processes; default: left unpinned


@dataclass(frozen=True)
class ValidateConfig:
    """A plan, the requests to send against it, and where the results go. Lengths and burstiness default to the
    plan's workload; `base_url` points at a running fleet instead of bringing one up."""

    plan_path: str  # plan.json from `pernode plan --out`
    profile_path: str | None = None  # the profile the plan was made from: also simulate the exact requests sent
    base_url: str | None = None
    num_prompts: int | None = None  # default: DEFAULT_DURATION_S of arrivals, at least MIN_PROMPTS
    seed: int = 0  # of the prompts and arrival times
    input_len: str | None = None  # N or LO:HI tokens
    output_len: str | None = None
    burstiness: float | None = None
    token_budget: int | None = None  # tokens per step in the same-trace simulation (default: the engine's)
    out: str | None = None  # predicted, measured and errors as JSON
    bench_out: str | None = None  # the full bench serve result as JSON
    placement: FleetPlacement = FleetPlacement()
    interval_seeds: int = 5  # runs of the measured size simulated for the predicted range of each figure
    anchor_s: float = ANCHOR_SECONDS  # arrivals of the speed anchor before the run (speed_anchor.py); 0: none

    def __post_init__(self) -> None:
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts={self.num_prompts}: allowed >= 1")
        if not 0 <= self.anchor_s <= 600:
            raise ValueError(f"anchor_s={self.anchor_s}: allowed 0 (no anchor) to 600 seconds")
        if self.interval_seeds < 1:
            raise ValueError(f"interval_seeds={self.interval_seeds}: allowed >= 1")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget={self.token_budget}: allowed >= 1")
        if self.burstiness is not None and not self.burstiness > 0:
            raise ValueError(f"burstiness={self.burstiness}: allowed > 0 (1 = Poisson)")
        for name in ("input_len", "output_len"):
            if getattr(self, name) is not None:
                LengthDist.parse(getattr(self, name), name)

    def num_prompts_at(self, rate_rps: float) -> int:
        return self.num_prompts or max(MIN_PROMPTS, math.ceil(rate_rps * DEFAULT_DURATION_S))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ValidateConfig:
        d = dict(d)
        d["placement"] = FleetPlacement(**(d.get("placement") or {}))
        return cls(**d)
