"""The cost frontier: each way of serving a model as (cost per million output tokens, perplexity), the points that
no other point beats on both, and the cheapest one within a quality budget.

Pareto optimality over two objectives (both minimised), as in multi-objective model selection; the planner
(planner.py) supplies each point's cost for one workload and SLO, the fixed perplexity protocol
(shrink/evaluate/perplexity.py) its quality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from pernode.price.fleet_plan import Plan


@dataclass(frozen=True)
class FrontierPoint:
    """One variant of the model, planned: its quality beside what its fleet costs."""

    name: str
    description: str
    perplexity: float
    ppl_increase: float  # perplexity / the baseline's - 1 (0.05 = 5% worse)
    feasible: bool  # some fleet meets the SLO
    replicas: int | None = None
    max_batch: int | None = None
    batch_limited_by: str | None = None  # tpot_slo | kv_cache | token_budget
    kv_bytes_per_token: float | None = None
    cost_per_month_usd: float | None = None
    cost_per_million_output_tokens_usd: float | None = None
    profile_kind: str = "measured"  # "projected" when the node's numbers come from a roofline projection
    on_frontier: bool = False
    reason: str | None = None  # why no fleet meets the SLO

    @property
    def cost(self) -> float:
        """$/M output tokens; infinite when no fleet meets the SLO."""
        c = self.cost_per_million_output_tokens_usd
        return math.inf if not self.feasible or c is None else float(c)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FrontierPoint":
        fields = cls.__dataclass_fields__
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"frontier point: unknown fields {sorted(unknown)}; allowed {', '.join(fields)}")
        return cls(**d)


def point_from_plan(name: str, description: str, perplexity: float, baseline_perplexity: float, plan: Plan,
                    kv_bytes_per_token: float | None = None) -> FrontierPoint:
    """A variant's point: its perplexity against the baseline's, and its planned fleet's size and bill."""
    for field_name, value in (("perplexity", perplexity), ("baseline_perplexity", baseline_perplexity)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{field_name}={value!r}: must be a finite number > 0")
    return FrontierPoint(
        name=name, description=description, perplexity=float(perplexity),
        ppl_increase=float(perplexity) / float(baseline_perplexity) - 1.0, feasible=plan.feasible,
        replicas=plan.replicas, max_batch=plan.max_batch.batch_size, batch_limited_by=plan.max_batch.limited_by.value,
        kv_bytes_per_token=kv_bytes_per_token,
        cost_per_month_usd=plan.cost_per_month_usd if plan.feasible else None,
        cost_per_million_output_tokens_usd=plan.cost_per_million_output_tokens_usd if plan.feasible else None,
        profile_kind=plan.profile_kind, reason=plan.reason)


def dominates(a: FrontierPoint, b: FrontierPoint) -> bool:
    """a is at least as cheap and at least as good as b, and strictly better in one of the two."""
    return (a.cost <= b.cost and a.perplexity <= b.perplexity
            and (a.cost < b.cost or a.perplexity < b.perplexity))


def pareto_front(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The feasible points no other feasible point dominates, cheapest first. Identical points are all kept."""
    feasible = [p for p in points if p.feasible and math.isfinite(p.cost)]
    front = [p for p in feasible if not any(dominates(q, p) for q in feasible)]
    return sorted(front, key=lambda p: (p.cost, p.perplexity))


def mark_frontier(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points again, in order, each with on_frontier set."""
    names = {id(p) for p in pareto_front(points)}
    return [replace(p, on_frontier=id(p) in names) for p in points]


def cheapest_within(points: Sequence[FrontierPoint], max_ppl_increase: float) -> FrontierPoint | None:
    """The cheapest feasible point whose perplexity is at most `max_ppl_increase` (0.05 = 5%) above the baseline's;
    ties go to the better perplexity. None if no point qualifies. It always lies on the frontier."""
    if not (isinstance(max_ppl_increase, (int, float)) and math.isfinite(max_ppl_increase) and max_ppl_increase >= 0):
        raise ValueError(f"max_ppl_increase={max_ppl_increase!r}: must be a finite fraction >= 0 (0.05 = 5%)")
    within = [p for p in points if p.feasible and math.isfinite(p.cost) and p.ppl_increase <= max_ppl_increase + 1e-12]
    return min(within, key=lambda p: (p.cost, p.perplexity), default=None)


def parse_fraction(text: str, name: str = "max_ppl_increase") -> float:
    """'5%' -> 0.05, '0.05' -> 0.05: a relative budget as people write it; ValueError naming `name` otherwise."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"{name}={text!r}: not a fraction; write e.g. 5% or 0.05") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={text!r}: must be >= 0 (e.g. 5% or 0.05)")
    return value


@dataclass(frozen=True)
class Frontier:
    """Every variant planned for one workload and SLO, the frontier marked, and what the numbers rest on."""

    baseline: str  # the variant perplexity increases are measured against
    points: tuple[FrontierPoint, ...]
    workload: str  # Workload.describe()
    slo: str  # SLO.describe()
    price: str  # where the node-hour price comes from
    notes: tuple[str, ...] = ()  # assumptions and projections, printed beside the table
    # the measurement rounds (order, load average, engine reload time per variant): what the $ column rests on
    rounds: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def build(cls, baseline: str, points: Sequence[FrontierPoint], workload: str, slo: str, price: str,
              notes: Sequence[str] = (), rounds: Sequence[Mapping[str, Any]] = ()) -> "Frontier":
        if baseline not in {p.name for p in points}:
            raise ValueError(f"baseline={baseline!r}: not among the variants {[p.name for p in points]}")
        return cls(baseline, tuple(mark_frontier(points)), workload, slo, price, tuple(notes), tuple(rounds))

    @property
    def frontier(self) -> list[FrontierPoint]:
        return [p for p in sorted(self.points, key=lambda p: (p.cost, p.perplexity)) if p.on_frontier]

    def cheapest_within(self, max_ppl_increase: float) -> FrontierPoint | None:
        return cheapest_within(self.points, max_ppl_increase)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "workload": self.workload, "slo": self.slo, "price": self.price,
                "notes": list(self.notes), "points": [p.to_dict() for p in self.points],
                "rounds": [dict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Frontier":
        try:
            return cls(d["baseline"], tuple(FrontierPoint.from_dict(p) for p in d["points"]), d["workload"],
                       d["slo"], d["price"], tuple(d.get("notes", ())), tuple(d.get("rounds", ())))
        except KeyError as e:
            raise ValueError(f"frontier: missing {e.args[0]}") from None
