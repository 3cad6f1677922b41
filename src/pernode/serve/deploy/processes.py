"""The processes a local Ray starts, found through /proc, so that stopping a fleet can check it ended them all.

Never `ray stop`: it ends every Ray on the machine, other users' too. A fleet ends what it started, by pid.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def child_processes(root: int | None = None) -> set[int]:
    """Pids of every live process descended from `root` (default: this process): a local Ray's GCS, raylet,
    agents, workers, Serve's controller, proxy and replicas, when this process started that Ray."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def still_running(pids) -> list[int]:
    """Those of `pids` that still run (zombies, already dead and waiting to be reaped, do not count)."""
    return sorted(pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] not in "ZX")


def wait_ended(pids, timeout_s: float, reap: bool = False) -> list[int]:
    """Wait up to `timeout_s` for `pids` to end; returns those still running. With `reap`, collect our exited
    children as they go (an exiting parent would leave them as zombies under an init that may not reap)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if reap:
            _reap_children()
        left = still_running(pids)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def _reap_children() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1])
