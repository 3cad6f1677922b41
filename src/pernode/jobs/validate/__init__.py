"""`pernode fleet validate`: run a plan's workload against a real fleet and set the measurements beside the plan.

`config` is what to run, `replay` the plan's workload as `bench serve` sends it, `compare` the predictions,
measurements and errors, `rescore` a recorded run predicted again, `cpu_share` the noise a shared machine adds,
`speed_anchor` the node's speed just before the run, `report` the table and JSON, `run` the job.
Errors are (measured - predicted) / predicted in percent: positive means slower (or more goodput) than predicted.
"""
from pernode.jobs.validate.compare import (METRICS, errors_pct, measured_from_bench, predicted_from_plan,
                                           predicted_same_trace)
from pernode.jobs.validate.config import DEFAULT_DURATION_S, FleetPlacement, ValidateConfig
from pernode.jobs.validate.replay import ReplayWorkload
from pernode.jobs.validate.report import print_validation
from pernode.jobs.validate.rescore import rescore, run_rescore
from pernode.jobs.validate.run import run_validate
from pernode.jobs.validate.speed_anchor import ANCHOR_SECONDS, MIN_ANCHOR_REQUESTS

__all__ = ["ANCHOR_SECONDS", "DEFAULT_DURATION_S", "METRICS", "MIN_ANCHOR_REQUESTS", "FleetPlacement", "ReplayWorkload",
           "ValidateConfig", "errors_pct", "measured_from_bench", "predicted_from_plan", "predicted_same_trace",
           "print_validation", "rescore", "run_rescore", "run_validate"]
