"""The two serving paths a profile can measure, each brought up beside the profile's own engine on loopback:
`serve` (a `pernode serve` process with the same engine flags) and `ray` (one Ray Serve replica of the same engine
behind Ray's HTTP proxy, as `pernode fleet validate` and `fleet up` deploy it).

The server (or replica) runs on this process's cores, where the profile was taken; Ray's other processes (proxy,
controller) and the HTTP client go to the remaining cores when the machine has any, as `fleet validate
--cpuset ... --client-cpuset ...` lays a fleet out. `layout` records who could run where.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import httpx

from pernode.config import EngineConfig
from pernode.serve.deploy import FleetSpec, LocalFleet, child_processes, free_port
from pernode.serve.deploy.cpuset import claims, cores_of
from pernode.serve.server.async_engine import ENGINE_THREAD_NAME
from pernode.serve.server.options import ServerSettings


@dataclass(frozen=True)
class ServingPath:
    """A running path: where to send requests, the cores the client should use, and the machine's split."""

    url: str
    client_cores: set[int] | None
    layout: dict
    server_pids: tuple[int, ...] = ()  # the process(es) serving on the measured cores: their CPU time is read


@dataclass(frozen=True)
class ServerCpu:
    """CPU seconds a serving process's threads have run so far: the engine's thread, and every other thread (the
    event loop, HTTP, tokenizing, streaming; in a Ray replica also Ray's own threads). `engine_s` is None when no
    thread carries the engine thread's OS name (then only the total means anything)."""

    engine_s: float | None
    serving_s: float

    @property
    def total_s(self) -> float:
        return self.serving_s + (self.engine_s or 0.0)

    def __sub__(self, earlier: ServerCpu) -> ServerCpu:
        engine = None if self.engine_s is None or earlier.engine_s is None else self.engine_s - earlier.engine_s
        return ServerCpu(engine, self.serving_s - earlier.serving_s)


def server_cpu_s(pids: tuple[int, ...]) -> ServerCpu:
    """The processes' CPU time so far, split by thread name (/proc/PID/task/TID/comm), at nanosecond resolution
    (schedstat). Time spent waiting for a busy core, or for the GIL, does not count: a loaded machine inflates it
    far less than wall time. With torch's intra-op threads (--num-threads > 1) their time counts as serving."""
    engine, serving, named = 0, 0, False
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
            if comm == ENGINE_THREAD_NAME:
                engine, named = engine + ns, True
            else:
                serving += ns
    return ServerCpu(engine / 1e9 if named else None, serving / 1e9)


def process_cpu_s(pids: tuple[int, ...]) -> float:
    """CPU seconds the processes' threads have run so far, all threads together."""
    return server_cpu_s(pids).total_s


def _cpu_list(cores: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def split_cores() -> tuple[set[int], set[int] | None]:
    """(server cores, client cores): the server on this process's cores, the client on the machine's others."""
    own = set(os.sched_getaffinity(0))
    rest = set(range(os.cpu_count() or 1)) - own
    return own, (rest or None)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    """Return once the `pernode serve` in `proc` answers GET /v1/models at `url`; raise if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pernode serve exited with status {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"pernode serve did not answer {url}/v1/models within {timeout_s:.0f} s")


@contextlib.contextmanager
def pernode_serve(engine_flags: Sequence[str], timeout_s: float = 600.0) -> Iterator[ServingPath]:
    """`pernode serve ENGINE_FLAGS` on a free loopback port, on this process's cores; stopped on exit."""
    server_cores, client_cores = split_cores()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pernode.cli", "serve", *engine_flags, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as server_log:
        proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            wait_ready(url, proc, timeout_s)
            layout = {"server_cores": cores_of(proc.pid), "client_cores": _cpu_list(client_cores or server_cores)}
            yield ServingPath(url, client_cores, layout, (proc.pid,))
        except Exception:
            server_log.seek(0)
            print("pernode serve output:\n" + server_log.read().decode(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _pin_other_ray_processes(replica_pids: set[int], cores: set[int]) -> list[str]:
    """Ray's processes that are not the replica (proxy, controller, raylet, GCS) onto `cores`, every thread."""
    where = set()
    for pid in child_processes() - replica_pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cores)
        except OSError:
            continue  # ended meanwhile
        where.add(cores_of(pid))
    return sorted(where - {None})


@contextlib.contextmanager
def ray_serve(engine: EngineConfig, timeout_s: float = 600.0) -> Iterator[ServingPath]:
    """One Ray Serve replica of `engine` pinned to this process's cores, Ray's other processes on the rest."""
    server_cores, client_cores = split_cores()
    threads = engine.num_threads or len(server_cores)
    spec = FleetSpec(engine=dataclasses.replace(engine, num_threads=threads), settings=ServerSettings(),
                     replicas=1, threads_per_replica=threads, cpusets=(_cpu_list(server_cores),),
                     port=free_port())
    threads_before = set(os.listdir("/proc/self/task"))
    with LocalFleet(spec, timeout_s=timeout_s) as fleet:
        if client_cores:  # Ray's driver threads in this process: off the engine's core, as Ray's other processes
            for tid in set(os.listdir("/proc/self/task")) - threads_before:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), client_cores)
        replica = claims(fleet.deployment.cpuset_claim_dir)
        replica_pids = {c["pid"] for c in replica.values()}
        others = _pin_other_ray_processes(replica_pids, client_cores) if client_cores else []
        layout = {"replica_cores": [c["cores"] for c in replica.values()],
                  "ray_other_processes_cores": others,
                  "client_cores": _cpu_list(client_cores or server_cores),
                  "startup_s": round(fleet.deployment.startup_s, 1)}
        yield ServingPath(fleet.url, client_cores, layout, tuple(sorted(replica_pids)))
