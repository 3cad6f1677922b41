"""How the machine was split during a validation: each replica's cores (as pinned, read back from /proc), the load
generator's, and those of Ray's other processes (proxy, controller), so the report says honestly who shared what.

With `client_cpuset`, this process and every Ray process that is not a replica are pinned there first: on a
machine with a core to spare, the load generator and the proxy then keep off the replicas' cores.
"""
from __future__ import annotations

import os

from pernode.serve.deploy import child_processes
from pernode.serve.deploy.cpuset import claims, cores_of, parse_cpu_list, pin_process


def _pin_pid(pid: int, cores: tuple[int, ...]) -> None:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:
                pass
    except OSError:
        pass  # ended meanwhile


def split_machine(claim_dir: str | None, client_cpuset: str | None) -> dict:
    """Pin the client side when asked, then record who may run where."""
    replicas = claims(claim_dir)
    replica_pids = {c["pid"] for c in replicas.values()}
    others = [pid for pid in child_processes() if pid not in replica_pids]
    if client_cpuset:
        cores = parse_cpu_list(client_cpuset, "client_cpuset")
        pin_process(cores)
        for pid in others:
            _pin_pid(pid, cores)
    replica_cores = [parse_cpu_list(c["cores"]) for c in replicas.values() if c["cores"]]
    client = cores_of(os.getpid())
    client_set = set(parse_cpu_list(client)) if client else set()
    shared = sorted(client_set & set().union(*map(set, replica_cores))) if replica_cores else sorted(client_set)
    disjoint = sum(len(c) for c in replica_cores) == len(set().union(*map(set, replica_cores))) \
        if replica_cores else False
    return {"machine_cores": os.cpu_count(),
            "replicas": [{"slot": slot, **c} for slot, c in sorted(replicas.items())],
            "replicas_on_own_cores": disjoint,
            "load_generator_cores": client,
            "ray_other_processes_cores": sorted({cores_of(pid) for pid in others} - {None}),
            "cores_shared_by_load_generator_and_replicas": shared}
