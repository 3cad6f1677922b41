"""How much of the machine processes other than ours used during a run: the noise a shared box adds to latencies.

Read from /proc: the machine's busy time in /proc/stat against the CPU time of this process and the fleet it
started (/proc/PID/stat utime, stime and their waited-for children).
"""
from __future__ import annotations

import os
import time

from pernode.serve.deploy import child_processes

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def tree_cpu_s(pids) -> float:
    """CPU-seconds used so far by `pids` (this process counts its waited-for children too)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) * _TICK_S
    return total


def _ours() -> set[int]:
    return {os.getpid(), *child_processes()}


class CpuShare:
    """Started at construction; `stop()` gives the cores used meanwhile by us and by everything else."""

    def __init__(self):
        self.start_busy, self.start_ours, self.start_t = busy_cpu_s(), tree_cpu_s(_ours()), time.monotonic()

    def stop(self) -> dict:
        busy, ours, wall = busy_cpu_s(), tree_cpu_s(_ours()), time.monotonic() - self.start_t
        others = max(0.0, (busy - self.start_busy) - (ours - self.start_ours))
        return {"wall_s": wall, "ours_cores": (ours - self.start_ours) / wall, "others_cores": others / wall,
                "machine_cores": os.cpu_count()}
