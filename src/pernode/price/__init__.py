"""Fleet: from one node's profile to a replica count and a bill (`pernode plan`)."""
from pernode.price.planner import Comparison, Plan, PlanPoint, compare_plans, plan
from pernode.price.pricing import PRICES, Price, resolve_price
from pernode.price.simulator import (FleetSimResult, ReplicaConfig, simulate_fifo_servers, simulate_fleet)
from pernode.slo import SLO
from pernode.price.step_time import MaxBatch, StepTimeModel, max_batch_size
from pernode.price.workload import LengthDist, RequestTrace, Workload

__all__ = ["Comparison", "FleetSimResult", "LengthDist", "MaxBatch", "PRICES", "Plan", "PlanPoint", "Price",
           "ReplicaConfig", "RequestTrace", "SLO", "StepTimeModel", "Workload", "compare_plans", "max_batch_size",
           "plan", "resolve_price", "simulate_fifo_servers", "simulate_fleet"]
