"""How many CPU threads the engine's torch ops use, chosen at start so that the team does not fight the box.

An OpenMP team only goes as fast as its slowest thread: every parallel region ends in a barrier. When the box is
busy (other processes on the same cores), a thread that loses its core stalls the whole team at each barrier, and
a decode step runs a few hundred small parallel regions. So the default is measured, not assumed: the CPUs this
process may run on (its affinity mask, capped by a cgroup CPU quota) bound the team, and a short probe times a
decode-sized and a prefill-sized matmul with one thread and with the full team, in interleaved pairs. The full team
is kept unless one thread is clearly and consistently faster: a neighbour at nice 19 yields its core to the team
at once, so a few slow samples while it runs must not halve the engine's throughput for the whole process.
An explicit count is taken as given.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pernode import envs

log = logging.getLogger("pernode.serve.engine")

# The probe's shapes: SmolLM2-sized projections at a decode step of 8 rows and a prefill chunk of 256 rows.
PROBE_SHAPES = ((8, 576, 1536), (256, 576, 1536))
PROBE_REPEATS = 2  # timed passes per probe sample (best of), after one warm-up pass
PROBE_ROUNDS = 7  # paired samples (one thread, the team; which goes first alternates)
# One thread replaces the team only when it is clearly faster (a team/one time ratio of at least this in the
# median pair) and consistently so (in at least CONSISTENT_SHARE of the pairs). Anything less keeps every core:
# a tie, or a team that lost a few samples to a neighbour's burst, is still the better bet over the process's life.
ONE_THREAD_MARGIN = 1.15
CONSISTENT_SHARE = 0.75


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


@functools.lru_cache(maxsize=4)
def _probe_operands(shapes: tuple[tuple[int, int, int], ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The probe's matrices, made once: the interleaved samples must time the matmuls, not the random fill."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)) for m, k, n in shapes]


def time_matmuls(num_threads: int, shapes=PROBE_SHAPES, repeats: int = PROBE_REPEATS) -> float:
    """Seconds for one pass over `shapes` at `num_threads`: the best of `repeats`, after a warm-up pass."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        pairs = _probe_operands(tuple(shapes))
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


def team_verdict(pairs: list[tuple[float, float]], team: int) -> tuple[bool, str]:
    """Whether to keep the full team, from paired probe samples (one thread's seconds, the team's seconds), and why.

    The team is dropped only when one thread is clearly faster in the median pair (the team takes at least
    ONE_THREAD_MARGIN times as long) and consistently so (in CONSISTENT_SHARE of the pairs). The pairs are compared
    one by one, so load that drifts over the probe scales both sides of a pair alike."""
    if not pairs:
        raise ValueError("team_verdict needs at least one (one thread, team) sample pair")
    ratios = [team_s / one_s if one_s > 0 else math.inf for one_s, team_s in pairs]
    median = statistics.median(ratios)
    slower = sum(r >= ONE_THREAD_MARGIN for r in ratios) / len(ratios)
    summary = f"team/one time ratio median {median:.2f}, team clearly slower in {slower:.0%} of {len(pairs)} pairs"
    if median >= ONE_THREAD_MARGIN and slower >= CONSISTENT_SHARE:
        return False, f"probe: 1 thread clearly faster than {team} (busy CPUs; {summary})"
    faster = "faster than" if median < 1 else "not clearly slower than"
    return True, f"probe: {team} threads {faster} 1 ({summary})"


def probe_pairs(probe: Callable[[int], float], team: int, rounds: int = PROBE_ROUNDS) -> list[tuple[float, float]]:
    """`rounds` (one thread, team) samples taken back to back, which one goes first alternating."""
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            one_s = probe(1)
            team_s = probe(team)
        else:
            team_s = probe(team)
            one_s = probe(1)
        pairs.append((one_s, team_s))
    return pairs


def choose_threads(requested: int | None, cpus: tuple[int, ...], quota: float | None,
                   probe: Callable[[int], float] | None = time_matmuls) -> ThreadPlan:
    """The thread count: `requested` when given; else the usable CPUs, lowered to one thread only when the probe
    finds one thread clearly and consistently faster than the full team (team_verdict). `probe=None` skips it."""
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
    pairs = probe_pairs(probe, usable)
    keep_team, reason = team_verdict(pairs, usable)
    medians = {1: statistics.median(p[0] for p in pairs), usable: statistics.median(p[1] for p in pairs)}
    return ThreadPlan(usable if keep_team else 1, cpus, reason, medians)


def apply_thread_plan(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads (process-wide) and log the choice with its reason."""
    torch.set_num_threads(plan.num_threads)
    log.info("CPU threads: %d (%s); CPUs allowed: %s%s", plan.num_threads, plan.reason, _ranges(plan.cpus),
             "" if not plan.probe_s else " ; probe medians " + ", ".join(f"{k} threads {1e3 * v:.2f} ms"
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
