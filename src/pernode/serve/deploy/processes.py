"""The processes a local Ray starts, found through /proc, so that stopping a fleet can check it ended them all.

Never `ray stop`: it ends every Ray on the machine, other users' too. A fleet ends what it started, by pid, and a
pid alone is not who a process is: pids are reused. A `ProcessRecord` keeps the pid with its start time (field 22
of /proc/PID/stat, clock ticks after boot) and its command line; `signal_recorded` signals only a process that
still has that start time and belongs to this user, through a pidfd so the check and the signal name one process.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
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


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (starttime, clock ticks after boot); None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])  # fields 3.. follow the name; starttime is field 22


@dataclass(frozen=True)
class ProcessRecord:
    """Who a process was when we started it: pid, start time, owner uid, command line."""

    pid: int
    start_time: int
    uid: int
    cmdline: str

    @classmethod
    def of(cls, pid: int) -> ProcessRecord | None:
        """The record of a live process; None when it is gone."""
        start = _start_time(pid)
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
        return None if start is None else cls(pid, start, uid, cmdline.strip())

    def to_dict(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time, "uid": self.uid, "cmdline": self.cmdline}

    @classmethod
    def from_dict(cls, d: dict) -> ProcessRecord:
        try:
            record = cls(int(d["pid"]), int(d["start_time"]), int(d["uid"]), str(d.get("cmdline", "")))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"process record {d!r}: expected pid, start_time and uid as integers") from None
        if record.pid < 2:
            raise ValueError(f"process record pid={record.pid}: allowed >= 2")
        return record

    def mismatch(self) -> str | None:
        """None while this very process still runs and belongs to this user; else why it must not be signalled."""
        start = _start_time(self.pid)
        if start is None or not still_running([self.pid]):
            return f"pid {self.pid} has ended"
        if start != self.start_time:
            return (f"pid {self.pid} is now another process (started at tick {start}, recorded {self.start_time}: "
                    f"{self.cmdline[:80]!r})")
        try:
            uid = os.stat(f"/proc/{self.pid}").st_uid
        except OSError:
            return f"pid {self.pid} has ended"
        if uid != os.getuid() or uid != self.uid:
            return f"pid {self.pid} belongs to uid {uid}, not to this user (uid {os.getuid()})"
        return None


def signal_recorded(record: ProcessRecord, sig: int) -> str | None:
    """Send `sig` to `record`'s process if it is still that process and ours; returns None when sent, else why
    not. Through a pidfd where the kernel has them, so a pid reused between the check and the signal is safe."""
    try:
        fd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return f"pid {record.pid} has ended"
    except (AttributeError, OSError):  # no pidfd (old kernel or Python): check, then kill by pid
        fd = None
    try:
        reason = record.mismatch()
        if reason is None:
            if fd is None:
                os.kill(record.pid, sig)
            else:
                signal.pidfd_send_signal(fd, sig)
        return reason
    except ProcessLookupError:
        return f"pid {record.pid} has ended"
    finally:
        if fd is not None:
            os.close(fd)


def records_running(records) -> list[ProcessRecord]:
    """Those of `records` whose very process still runs (a reused pid does not count)."""
    return [r for r in records if r.mismatch() is None]


def wait_records_ended(records, timeout_s: float) -> list[ProcessRecord]:
    """Wait up to `timeout_s` for the recorded processes to end; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = records_running(records)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)
