"""The planner's answer as a typed object, and the one place that writes and reads it as JSON (`plan.json`).

`pernode plan --out` writes it; `pernode fleet up|validate` and the report read it back with `Plan.load`, so no
reader spells out the JSON's keys or parses the workload back out of prose.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pernode.price.pricing import Price
from pernode.price.max_batch import MaxBatch
from pernode.price.workload import Workload
from pernode.records import read_json
from pernode.slo import SLO


@dataclass(frozen=True)
class PlanPoint:
    """One fleet size as simulated: the curve a plot draws."""

    replicas: int
    attainment: float
    ttft_p99_s: float
    tpot_p99_s: float
    e2e_p99_s: float
    utilisation: float
    cost_per_hour_usd: float
    meets_target: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlanPoint":
        return cls(int(d["replicas"]), _float(d["attainment"]), _float(d["ttft_p99_s"]), _float(d["tpot_p99_s"]),
                   _float(d["e2e_p99_s"]), _float(d["utilisation"]), _float(d["cost_per_hour_usd"]),
                   bool(d["meets_target"]))


@dataclass(frozen=True)
class Plan:
    """The recommended fleet and what it is predicted to do and cost."""

    feasible: bool
    reason: str | None
    replicas: int | None
    profile_label: str
    profile_kind: str
    model_name: str
    hardware_name: str
    projected_from: str | None
    workload: Workload
    slo: SLO
    attainment_target: float
    headroom: float
    policy: str  # the router, a name in simulator.ROUTERS
    max_batch: MaxBatch
    token_budget: int = 2048  # tokens one replica schedules per step, as simulated
    capacity_rps_per_replica: float | None = None
    request_service_s: float | None = None  # mean time a request holds a batch slot at full batch
    min_replicas_for_utilisation: int | None = None
    queueing: dict = field(default_factory=dict)
    utilisation: float | None = None
    latency_s: dict = field(default_factory=dict)  # {"ttft": {"p50":..}, "tpot": .., "e2e": ..} from the simulator
    attainment: float | None = None
    goodput_rps: float | None = None
    goodput_output_tokens_per_s: float | None = None
    busy_fraction: float | None = None
    slot_occupancy: float | None = None
    price: Price | None = None
    cost_per_hour_usd: float | None = None
    cost_per_month_usd: float | None = None
    cost_per_million_output_tokens_usd: float | None = None
    curve: tuple[PlanPoint, ...] = ()
    simulated_requests: int = 0
    seed: int = 0
    notes: tuple[str, ...] = ()
    # {"seeds": [...], "ttft_p50_ms": [low, high], ..., "goodput_rps": [low, high]}: the chosen fleet on each seed
    intervals: dict = field(default_factory=dict)
    rests_on: tuple[str, ...] = ()  # the measured numbers the plan was computed from
    assumptions: tuple[str, ...] = ()  # what a projected profile assumed; empty when measured

    def to_dict(self) -> dict:
        """Plain JSON-able data; times in seconds as in the field names, SLO in milliseconds as users write it.
        NaN (e.g. TPOT when every output is one token) becomes null, since JSON has no NaN."""
        w = self.workload
        return _json_clean({
            "feasible": self.feasible,
            "reason": self.reason,
            "replicas": self.replicas,
            "profile": {"label": self.profile_label, "kind": self.profile_kind, "model": self.model_name,
                        "hardware": self.hardware_name, "projected_from": self.projected_from},
            # description and means are for people and the HTML report; from_dict reads the structure.
            "workload": {"description": w.describe(), "rate_rps": w.rate_rps, "mean_input_tokens": w.mean_input_tokens,
                         "mean_output_tokens": w.mean_output_tokens, **w.to_dict()},
            "slo_ms": self.slo.to_dict(),
            "attainment_target": self.attainment_target,
            "headroom": self.headroom,
            "policy": self.policy,
            "max_batch_per_replica": self.max_batch.to_dict(),
            "token_budget": self.token_budget,
            "capacity_rps_per_replica": self.capacity_rps_per_replica,
            "request_service_s": self.request_service_s,
            "min_replicas_for_utilisation": self.min_replicas_for_utilisation,
            "queueing": self.queueing,
            "utilisation": self.utilisation,
            "latency_s": self.latency_s,
            "attainment": self.attainment,
            "goodput_rps": self.goodput_rps,
            "goodput_output_tokens_per_s": self.goodput_output_tokens_per_s,
            "busy_fraction": self.busy_fraction,
            "slot_occupancy": self.slot_occupancy,
            "price": None if self.price is None else self.price.to_dict(),
            "cost_per_hour_usd": self.cost_per_hour_usd,
            "cost_per_month_usd": self.cost_per_month_usd,
            "cost_per_million_output_tokens_usd": self.cost_per_million_output_tokens_usd,
            "curve": [p.to_dict() for p in self.curve],
            "simulated_requests": self.simulated_requests,
            "seed": self.seed,
            "notes": list(self.notes),
            "intervals": self.intervals,
            "rests_on": list(self.rests_on),
            "assumptions": list(self.assumptions),
        })

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """The inverse of `to_dict`. Latencies that JSON stored as null (no TPOT) come back as NaN."""
        if not isinstance(d, Mapping):
            raise ValueError(f"plan: expected a JSON object, got {type(d).__name__}")
        try:
            prof = d["profile"]
            return cls(
                feasible=bool(d["feasible"]), reason=d["reason"], replicas=_opt_int(d["replicas"]),
                profile_label=str(prof["label"]), profile_kind=str(prof["kind"]), model_name=str(prof["model"]),
                hardware_name=str(prof["hardware"]), projected_from=prof.get("projected_from"),
                workload=Workload.from_dict(d["workload"]), slo=SLO.from_dict(d["slo_ms"]),
                attainment_target=float(d["attainment_target"]), headroom=float(d["headroom"]),
                policy=str(d["policy"]), max_batch=MaxBatch.from_dict(d["max_batch_per_replica"]),
                token_budget=int(d.get("token_budget", 2048)),
                capacity_rps_per_replica=_opt_float(d.get("capacity_rps_per_replica")),
                request_service_s=_opt_float(d.get("request_service_s")),
                min_replicas_for_utilisation=_opt_int(d.get("min_replicas_for_utilisation")),
                queueing=dict(d.get("queueing") or {}), utilisation=_opt_float(d.get("utilisation")),
                latency_s={m: {q: _float(v) for q, v in qs.items()} for m, qs in (d.get("latency_s") or {}).items()},
                attainment=_opt_float(d.get("attainment")), goodput_rps=_opt_float(d.get("goodput_rps")),
                goodput_output_tokens_per_s=_opt_float(d.get("goodput_output_tokens_per_s")),
                busy_fraction=_opt_float(d.get("busy_fraction")), slot_occupancy=_opt_float(d.get("slot_occupancy")),
                price=None if d.get("price") is None else Price.from_dict(d["price"]),
                cost_per_hour_usd=_opt_float(d.get("cost_per_hour_usd")),
                cost_per_month_usd=_opt_float(d.get("cost_per_month_usd")),
                cost_per_million_output_tokens_usd=_opt_float(d.get("cost_per_million_output_tokens_usd")),
                curve=tuple(PlanPoint.from_dict(p) for p in d.get("curve") or ()),
                simulated_requests=int(d.get("simulated_requests", 0)), seed=int(d.get("seed", 0)),
                notes=tuple(str(n) for n in d.get("notes") or ()), intervals=dict(d.get("intervals") or {}),
                rests_on=tuple(str(n) for n in d.get("rests_on") or ()),
                assumptions=tuple(str(n) for n in d.get("assumptions") or ()))
        except KeyError as e:
            why = f"plan: missing key {e.args[0]!r} (written by another pernode version? re-run `pernode plan`)"
            raise ValueError(why) from None
        except (TypeError, AttributeError) as e:
            raise ValueError(f"plan: a field has the wrong type ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan.json written by `save` (`pernode plan --out`); errors name the file."""
        data = read_json(path, "plan file")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"plan file {os.fspath(path)}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)
            f.write("\n")


def _json_clean(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    if isinstance(o, bool) or o is None or isinstance(o, str):
        return o
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
