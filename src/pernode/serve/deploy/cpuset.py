"""Each replica on cores of its own: a CPU list per replica (`--cpuset 0 --cpuset 1`), claimed by the replica
process at start and applied with sched_setaffinity to every one of its threads, so replicas on one node never
share a core and each runs with as many torch threads as it has cores, the thread count it was profiled with.

Ray Serve gives a replica no index, so the replicas of one node share a claim folder: the first to create
`slot-I` (O_EXCL) owns cpuset I; a slot whose owner died is taken over, so a restarted replica gets its cores back.
"""
from __future__ import annotations

import os


def parse_cpu_list(text: str, name: str = "cpuset") -> tuple[int, ...]:
    """Linux's CPU list form ('0', '0-3', '0,2,4-5') as sorted core ids; ValueError naming `name` otherwise."""
    cores: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cores.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a CPU list such as 0, 0-3 or 0,2,4-5") from None
    return tuple(sorted(cores))


def check_cpusets(cpusets: tuple[str, ...], replicas: int) -> list[tuple[int, ...]]:
    """One CPU list per replica, disjoint, on cores this process may use."""
    if len(cpusets) != replicas:
        raise ValueError(f"cpusets: {len(cpusets)} CPU lists for {replicas} replicas; give one --cpuset per replica")
    parsed = [parse_cpu_list(c, f"cpusets[{i}]") for i, c in enumerate(cpusets)]
    allowed = os.sched_getaffinity(0)
    seen: set[int] = set()
    for i, cores in enumerate(parsed):
        missing = set(cores) - allowed
        if missing:
            raise ValueError(f"cpusets[{i}]={cpusets[i]!r}: cores {sorted(missing)} are not available here "
                             f"(allowed: {sorted(allowed)})")
        if seen & set(cores):
            raise ValueError(f"cpusets[{i}]={cpusets[i]!r}: shares cores {sorted(seen & set(cores))} with an "
                             f"earlier replica; give each replica cores of its own")
        seen.update(cores)
    return parsed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_slot(claim_dir: str, num_slots: int) -> int:
    """The first slot in `claim_dir` no live process holds, now held by this process."""
    os.makedirs(claim_dir, mode=0o700, exist_ok=True)
    for take_over in (False, True):  # free slots first; then those whose replica died
        for i in range(num_slots):
            path = os.path.join(claim_dir, f"slot-{i}")
            if take_over and not _owner_alive(path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return i
    raise RuntimeError(f"every one of the {num_slots} cpusets in {claim_dir} is held by a live replica")


def _owner_alive(path: str) -> bool:
    try:
        with open(path) as f:
            return _alive(int(f.read().strip() or 0))
    except (OSError, ValueError):
        return False


def pin_process(cores: tuple[int, ...]) -> None:
    """Set the affinity of every thread of this process (sched_setaffinity acts on one thread; threads made later
    inherit it from their creator)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass  # a thread that ended meanwhile
    os.sched_setaffinity(0, cores)


def cores_of(pid: int) -> str | None:
    """The CPU list a process may run on (/proc/PID/status Cpus_allowed_list); None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def claims(claim_dir: str | None) -> dict[int, dict]:
    """{slot: {"pid": replica pid, "cores": its CPU list now}} for the replicas that claimed a cpuset."""
    out: dict[int, dict] = {}
    if not claim_dir or not os.path.isdir(claim_dir):
        return out
    for name in sorted(os.listdir(claim_dir)):
        if not name.startswith("slot-"):
            continue
        try:
            with open(os.path.join(claim_dir, name)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        out[int(name.removeprefix("slot-"))] = {"pid": pid, "cores": cores_of(pid)}
    return out
