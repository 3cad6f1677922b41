"""How many CPU threads the engine's torch ops use, chosen at start so that the team does not fight the box.

An OpenMP team only goes as fast as its slowest thread: every parallel region ends in a barrier. When the box is
busy (other processes on the same cores), a thread that loses its core stalls the whole team at each barrier, and
a decode step runs a few hundred small parallel regions. So the default is measured, not assumed: the CPUs this
process may run on (its affinity mask, capped by a cgroup CPU quota) bound the team, and a short probe times a
decode-sized and a prefill-sized matmul with one thread and with the full team, keeping the full team only where
it is faster on the two together. An explicit count is taken as given.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pernode import envs

log = logging.getLogger("pernode.serve.engine")

# The probe's shapes: SmolLM2-sized projections at a decode step of 8 rows and a prefill chunk of 256 rows.
PROBE_SHAPES = ((8, 576, 1536), (256, 576, 1536))
PROBE_REPEATS = 5
# The full team must beat one thread by this factor: a tie is not worth the stalls a busy box adds later.
TEAM_MARGIN = 0.9


@dataclass(frozen=True)
class ThreadPlan:
    num_threads: int
    cpus: tuple[int, ...]  # CPUs this process may run on
    reason: str
    probe_s: dict[int, float] = field(default_factory=dict)  # threads -> probe seconds (empty when not probed)

    def to_dict(self) -> dict:
        return {"num_threads": self.num_threads, "cpus": list(self.cpus), "reason": self.reason,
                "probe_s": {str(k): v for k, v in self.probe_s.items()}}


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs the scheduler lets this process use (taskset, cpuset cgroups, Ray's placement)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return tuple(range(os.cpu_count() or 1))


def cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs' worth of time a cgroup v2 quota grants (`cpu.max` "200000 100000" -> 2.0); None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus(cpus: tuple[int, ...], quota: float | None) -> int:
    """Threads that can run at once: the affinity mask, or fewer when a quota grants less time than that."""
    n = len(cpus)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def time_matmuls(num_threads: int, shapes=PROBE_SHAPES, repeats: int = PROBE_REPEATS) -> float:
    """Seconds for one pass over `shapes` at `num_threads`: the best of `repeats`, after a warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        g = torch.Generator().manual_seed(0)
        pairs = [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)) for m, k, n in shapes]
        best = math.inf
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for a, b in pairs:
                torch.mm(a, b)
            if i:  # the first pass warms caches and the thread pool
                best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(before)


def choose_threads(requested: int | None, cpus: tuple[int, ...], quota: float | None,
                   probe: Callable[[int], float] | None = time_matmuls) -> ThreadPlan:
    """The thread count: `requested` when given; else the usable CPUs, lowered to one thread when the probe finds
    the full team no faster than one thread (a busy box). `probe=None` skips measuring."""
    usable = usable_cpus(cpus, quota)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_threads={requested} is out of range: allowed >= 1, or None to choose")
        reason = "given"
        if requested > usable:
            reason = f"given (more than the {usable} usable CPUs: threads will share cores)"
        return ThreadPlan(requested, cpus, reason)
    if usable == 1:
        return ThreadPlan(1, cpus, "one usable CPU")
    if probe is None:
        return ThreadPlan(usable, cpus, "usable CPUs (not probed)")
    times = {1: probe(1), usable: probe(usable)}
    if times[usable] < TEAM_MARGIN * times[1]:
        return ThreadPlan(usable, cpus, f"probe: {usable} threads faster than 1", times)
    return ThreadPlan(1, cpus, f"probe: {usable} threads no faster than 1 (busy CPUs)", times)


def apply_thread_plan(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads (process-wide) and log the choice with its reason."""
    torch.set_num_threads(plan.num_threads)
    log.info("CPU threads: %d (%s); CPUs allowed: %s%s", plan.num_threads, plan.reason, _ranges(plan.cpus),
             "" if not plan.probe_s else " ; probe " + ", ".join(f"{k} threads {1e3 * v:.2f} ms"
                                                                 for k, v in plan.probe_s.items()))


def _ranges(cpus: tuple[int, ...]) -> str:
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


@functools.cache
def probed_plan(usable: int) -> ThreadPlan:
    """The probe runs once per process: engines built later (tests, the profiler) reuse its answer."""
    return choose_threads(None, allowed_cpus(), cgroup_cpu_quota())


def plan_threads(num_threads: int | None, device: torch.device) -> ThreadPlan:
    """The engine's thread plan: `num_threads` when set, else OMP_NUM_THREADS when set, else chosen (probed on CPU;
    on an accelerator the host threads only feed it, so the usable CPUs without a probe)."""
    cpus, quota = allowed_cpus(), cgroup_cpu_quota()
    if num_threads is not None:
        return choose_threads(num_threads, cpus, quota)
    omp = envs.omp_num_threads()
    if omp is not None:
        plan = choose_threads(omp, cpus, quota)
        return ThreadPlan(plan.num_threads, cpus, "OMP_NUM_THREADS")
    if device.type != "cpu":
        return choose_threads(None, cpus, quota, probe=None)
    return probed_plan(usable_cpus(cpus, quota))
