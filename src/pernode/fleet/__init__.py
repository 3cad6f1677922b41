"""Fleet: from one node's profile to a replica count and a bill (`pernode plan`)."""
from pernode.fleet.planner import Comparison, Plan, PlanPoint, compare_plans, plan
from pernode.fleet.pricing import PRICES, Price, resolve_price
from pernode.fleet.simulator import (FleetSimResult, ReplicaConfig, simulate_fifo_servers, simulate_fleet)
from pernode.fleet.slo import SLO
from pernode.fleet.step_time import MaxBatch, StepTimeModel, max_batch_size
from pernode.fleet.workload import LengthDist, RequestTrace, Workload

__all__ = ["Comparison", "FleetSimResult", "LengthDist", "MaxBatch", "PRICES", "Plan", "PlanPoint", "Price",
           "ReplicaConfig", "RequestTrace", "SLO", "StepTimeModel", "Workload", "compare_plans", "max_batch_size",
           "plan", "resolve_price", "simulate_fifo_servers", "simulate_fleet"]
