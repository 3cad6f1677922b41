"""Fleet: from one node's profile to a replica count and a bill (`pernode plan`)."""
from pernode.price.fleet_plan import Plan, PlanPoint
from pernode.price.fleet_result import FleetSimResult
from pernode.price.planner import Comparison, compare_plans, plan
from pernode.price.pricing import PRICES, Price, resolve_price
from pernode.price.replica import ReplicaConfig
from pernode.price.simulator import POLICIES, simulate_fifo_servers, simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.max_batch import BatchLimit, MaxBatch, max_batch_size
from pernode.price.workload import LengthDist, RequestTrace, Workload
from pernode.slo import SLO

__all__ = ["POLICIES", "BatchLimit", "Comparison", "FleetSimResult", "LengthDist", "MaxBatch", "PRICES", "Plan",
           "PlanPoint", "Price", "ReplicaConfig", "RequestTrace", "SLO", "StepTimeModel", "Workload", "compare_plans",
           "max_batch_size", "plan", "resolve_price", "simulate_fifo_servers", "simulate_fleet"]
