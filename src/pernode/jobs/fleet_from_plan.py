"""A plan's fleet: the replicas and max batch per replica that `pernode plan` recommends, as a `FleetSpec` to deploy.

The planner knows nothing of Ray and the fleet nothing of plans; this is where the two meet.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from pernode.config import EngineConfig
from pernode.price.planner import Plan
from pernode.serve.deploy import Autoscale, FleetSpec
from pernode.serve.server.options import ServerSettings


def plan_replicas(plan: Plan) -> int:
    """The plan's replica count; an error when the plan found none that meets its SLO. A fleet evaluated at a
    given size (`pernode plan --replicas`) has its size even when it misses the SLO: that fleet can be run."""
    if not isinstance(plan.replicas, int) or plan.replicas < 1:
        raise ValueError(f"the plan is not feasible ({plan.reason or 'no replica count'}): nothing to deploy; "
                         f"re-plan with a looser SLO or a lower rate")
    return plan.replicas


def autoscale_for_plan(plan: Plan) -> Autoscale:
    """Autoscaling from the plan's replicas up to twice as many, aiming at the requests one replica holds at the
    planned rate (see `Autoscale.for_load`)."""
    e2e_p50_s = (plan.latency_s.get("e2e") or {}).get("p50")
    return Autoscale.for_load(plan_replicas(plan), plan.workload.rate_rps, e2e_p50_s, plan.max_batch.batch_size)


def fleet_spec_for_plan(plan: Plan, engine: EngineConfig, settings: ServerSettings | None = None, *,
                        replicas: int | None = None, autoscale: Autoscale | None = None,
                        autoscale_to_plan: bool = False, **placement: Any) -> FleetSpec:
    """The fleet `plan` recommends: `engine` at the plan's max batch per replica (`max_num_seqs`), the plan's
    replicas unless `replicas` is given, and with `autoscale_to_plan` autoscaling around them. `placement` holds
    the other `FleetSpec` fields (num_cpus_per_replica, port, ...)."""
    planned = plan_replicas(plan)
    if autoscale_to_plan:
        autoscale = autoscale_for_plan(plan)
    return FleetSpec(engine=dataclasses.replace(engine, max_num_seqs=int(plan.max_batch.batch_size)),
                     settings=settings or ServerSettings(), replicas=planned if replicas is None else replicas,
                     autoscale=autoscale, **placement)
