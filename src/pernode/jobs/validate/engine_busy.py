"""The replica engine's own time over a validation run, measured against the simulator's: is the model's step time
the engine's?

Near capacity a latency prediction moves several times faster than the step time under it (queueing: the wait
grows like 1 / (1 - utilisation)); on the recorded chat grid a 5% change in the engine's speed moved the 90%-load
TPOT p50 error by about 17 points and the 30%-load one by about 7 (docs/fleet.md). A TPOT error at 90% alone cannot
tell a wrong step time from a wrong queue. This sets the server's step clock over the run (its /metrics:
`pernode:engine_steps`, `pernode:engine_step_seconds`, `pernode:engine_step_cpu_seconds`, scraped before and after
the workload) beside the simulated replica's steps and busy seconds on the same trace: their ratio is the model's
step-time error itself, before any queueing magnifies it, and the wall beyond the engine thread's CPU is what
the steps waited (for the core or the GIL). Through Ray with several replicas /metrics answers from one replica;
the figures are then that replica's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pernode.price.fleet_result import FleetSimResult

STEP_KEYS = ("steps", "step_wall_s", "step_cpu_s")


def engine_busy(before: dict | None, after: dict | None, predicted: FleetSimResult | None) -> dict[str, Any]:
    """{'measured': steps, wall and CPU seconds of the engine's steps over the run (None without the server's step
    clock), 'predicted': the simulated replicas' busy seconds (and steps when counted), 'wall_over_predicted'}."""
    out: dict[str, Any] = {"measured": None, "predicted": None, "wall_over_predicted": None}
    if before and after and all(k in before and k in after for k in STEP_KEYS):
        steps, wall, cpu = (after[k] - before[k] for k in STEP_KEYS)
        out["measured"] = {"steps": int(steps), "wall_s": wall, "cpu_s": cpu,
                           "wall_per_step_ms": wall / steps * 1e3 if steps > 0 else None,
                           "waited_per_step_ms": (wall - cpu) / steps * 1e3 if steps > 0 else None}
    if predicted is not None and len(predicted.busy_s):
        busy = float(np.sum(predicted.busy_s))
        predicted_steps = int(np.sum(predicted.steps)) if predicted.steps is not None else None
        out["predicted"] = {"busy_s": busy, "steps": predicted_steps,
                            "wall_per_step_ms": busy / predicted_steps * 1e3 if predicted_steps else None}
        if out["measured"] and busy > 0:
            out["wall_over_predicted"] = out["measured"]["wall_s"] / busy
    return out


def describe_engine_busy(busy: dict) -> list[str]:
    m, p = busy.get("measured"), busy.get("predicted")
    if not m or not p:
        return []
    line = (f"engine steps over the run: measured {m['steps']} steps, {m['wall_s']:.1f} s wall "
            f"({m['cpu_s']:.1f} s the engine thread's CPU; waited {m['waited_per_step_ms'] or 0:.2f} ms a step); "
            f"predicted {p['busy_s']:.1f} s busy")
    if p.get("steps"):
        line += f" over {p['steps']} steps"
    if busy.get("wall_over_predicted"):
        line += f": the engine took {busy['wall_over_predicted']:.3f}x the model's step time"
    return [line]
