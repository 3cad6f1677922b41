"""`pernode fleet up|down`: N replicas of pernode's engine as one Ray Serve deployment behind the OpenAI route.

Each replica loads one `LLMEngine` and serves it through our own FastAPI app (`server.app.build_app`), mounted with
`serve.ingress`, so Ray Serve's HTTP proxy answers `/v1/completions`, `/v1/chat/completions` and `/v1/models`
exactly as `pernode serve` does: `pernode bench serve` and the `openai` client work against it unchanged.

Routing is Ray Serve's default, power of two choices on queue length (Mitzenmacher, "The Power of Two Choices in
Randomized Load Balancing", 2001): each request goes to the less loaded of two sampled replicas. With two replicas
that is join-the-shortest-queue; the planner's model of it is `least_outstanding` (ROUTER_POLICY). So that Ray's
router does not hold requests back in a queue of its own (the planner's replicas queue in their engines),
`max_ongoing_requests` defaults to the engine's batch plus its waiting room.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pernode.config import EngineConfig
from pernode.serve.server.options import ServerSettings

log = logging.getLogger("pernode.price")

ROUTER_POLICY = "least_outstanding"  # the planner's policy that models Ray Serve's default router
REPLICA_HEADER = "x-pernode-replica"  # every response names the replica that served it
DEPLOYMENT_NAME = "pernode"
DEFAULT_APP_NAME = "pernode"
STATE_FILE = Path(os.environ.get("PERNODE_FLEET_STATE", f"/tmp/pernode-fleet-{os.getuid()}.json"))


@dataclass(frozen=True)
class Autoscale:
    """Ray Serve's autoscaling_config: replicas between min and max, aiming at target ongoing requests each."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"--autoscale {self.min_replicas},{self.max_replicas},...: need 0 <= MIN <= MAX and "
                             f"MAX >= 1 replicas")
        if not (math.isfinite(self.target_ongoing_requests) and self.target_ongoing_requests > 0):
            raise ValueError(f"--autoscale target_ongoing_requests = {self.target_ongoing_requests!r}: must be > 0 "
                             f"requests per replica")

    @classmethod
    def parse(cls, text: str) -> Autoscale:
        """'MIN,MAX,TARGET', e.g. '1,4,8'."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            lo, hi, target = int(parts[0]), int(parts[1]), float(parts[2])
            if len(parts) != 3:
                raise IndexError
        except (ValueError, IndexError):
            raise ValueError(f"--autoscale {text!r}: expected MIN,MAX,TARGET_ONGOING_REQUESTS, e.g. 1,4,8, or "
                             f"'plan' with --plan") from None
        return cls(lo, hi, target)

    @classmethod
    def from_plan(cls, plan: dict) -> Autoscale:
        """Keep the plan's replicas as the floor, allow twice as many, and aim at the requests one replica holds
        at the planned rate (Little's law: rate x mean time in system / replicas, the median E2E standing in for
        the mean). Above the planned rate the ongoing count rises past the target and Ray adds replicas."""
        n = _plan_replicas(plan)
        e2e = ((plan.get("latency_s") or {}).get("e2e") or {}).get("p50")
        per_replica = plan["workload"]["rate_rps"] * e2e / n if e2e else None
        batch = plan["max_batch_per_replica"]["batch_size"]
        target = max(1.0, round(per_replica, 1)) if per_replica else float(batch)
        return cls(n, 2 * n, min(target, float(batch)))

    def to_config(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "target_ongoing_requests": self.target_ongoing_requests}


@dataclass
class FleetSpec:
    """What to deploy: the engine of every replica, the server in front of it, and how many and how big."""

    engine: EngineConfig
    settings: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    replicas: int = 1
    autoscale: Autoscale | None = None
    num_cpus_per_replica: float | None = None  # default: the cluster's CPUs / the most replicas
    threads_per_replica: int | None = None  # default: num_cpus_per_replica rounded down, at least 1
    max_ongoing_requests: int | None = None  # default: max_num_seqs + max_queued_requests
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = DEFAULT_APP_NAME

    @property
    def max_replicas(self) -> int:
        return self.autoscale.max_replicas if self.autoscale else self.replicas

    def resources(self, cluster_cpus: float, node_cpus: float | None = None) -> tuple[float, int]:
        """(num_cpus, torch threads) per replica: the cluster's CPUs shared out so replicas never oversubscribe,
        and no replica asks for more than the largest node has."""
        if self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: must be >= 1")
        cpus = self.num_cpus_per_replica
        if cpus is None:
            share = cluster_cpus / self.max_replicas
            cpus = max(0.01, math.floor(min(share, node_cpus or share) * 100) / 100)
        if not cpus > 0:
            raise ValueError(f"--num-cpus-per-replica {cpus}: must be > 0 (fractions such as 0.5 are fine)")
        if cpus * self.max_replicas > cluster_cpus + 1e-9:
            log.warning("%d replicas x %g CPUs ask for more than the cluster's %g CPUs: Ray will leave some "
                        "pending", self.max_replicas, cpus, cluster_cpus)
        threads = self.threads_per_replica or max(1, int(cpus))
        return cpus, threads


def _plan_replicas(plan: dict) -> int:
    n = plan.get("replicas")
    if not plan.get("feasible") or not isinstance(n, int) or n < 1:
        raise ValueError(f"the plan is not feasible ({plan.get('reason') or 'no replica count'}): nothing to "
                         f"deploy; re-plan with a looser --slo or a lower --rate")
    return n


def load_plan(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except OSError as e:
        raise ValueError(f"--plan {path}: cannot read it ({e.strerror}); write one with `pernode plan --out`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--plan {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(plan, dict) or "max_batch_per_replica" not in plan or "workload" not in plan:
        raise ValueError(f"--plan {path}: not a plan (expected the JSON of `pernode plan --out`)")
    _plan_replicas(plan)
    return plan


# ---- the replica ---------------------------------------------------------------------------------------------

class _ReplicaHeader:
    """Pure ASGI: add `x-pernode-replica: ID` to every HTTP response, so a client can see who served it."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _replica_id() -> str:
    from ray import serve

    try:
        ctx = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - outside a replica (tests of the builder): no id to give
        return f"pid-{os.getpid()}"
    rid = getattr(ctx, "replica_id", None)
    return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or rid or os.getpid())


def _app_builder(engine: EngineConfig, settings: ServerSettings, threads: int):
    """The ASGI app factory Ray calls once in each replica's constructor: load the engine on `threads` threads,
    then our OpenAI app around it (its lifespan warms the engine up before Ray marks the replica ready)."""

    def build_pernode_app():
        import torch

        from pernode.serve.engine.llm_engine import LLMEngine
        from pernode.serve.server.app import build_app
        from pernode.serve.server.serve import describe_engine

        torch.set_num_threads(threads)
        llm = LLMEngine(dataclasses.replace(engine, num_threads=threads))
        replica = _replica_id()
        logging.getLogger("ray.serve").info("pernode replica %s: %s, %d torch threads", replica,
                                            describe_engine(llm), threads)
        app = build_app(llm, settings)
        app.add_middleware(_ReplicaHeader, replica=replica)
        return app

    return build_pernode_app


class PernodeReplica:
    """The deployment's class; `serve.ingress` adds the ASGI app. Ray calls `check_health` every period and
    restarts a replica whose engine died or failed to load."""

    def check_health(self) -> None:
        state = self.app.state.server
        if state.status == "failed":
            raise RuntimeError(f"the model failed to load: {state.load_error}")
        if state.async_engine is not None and state.async_engine.dead:
            raise RuntimeError(f"the engine loop stopped: {state.async_engine.dead_reason}")


def build_application(spec: FleetSpec, cluster_cpus: float, node_cpus: float | None = None):
    """The Ray Serve application for `spec` (not yet running), and the resources each replica gets."""
    from ray import serve

    spec.settings.validate()
    cpus, threads = spec.resources(cluster_cpus, node_cpus)
    thread_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    max_ongoing = spec.max_ongoing_requests or spec.engine.max_num_seqs + spec.settings.max_queued_requests
    options = dict(name=DEPLOYMENT_NAME, max_ongoing_requests=max_ongoing,
                   ray_actor_options={"num_cpus": cpus,
                                      "runtime_env": {"env_vars": {**thread_env, "TOKENIZERS_PARALLELISM": "false"}}},
                   health_check_period_s=5.0, graceful_shutdown_timeout_s=spec.settings.shutdown_timeout_s)
    if spec.autoscale is not None:
        options["autoscaling_config"] = spec.autoscale.to_config()
    else:
        options["num_replicas"] = spec.replicas
    ingress = serve.ingress(_app_builder(spec.engine, spec.settings, threads))(PernodeReplica)
    deployment = serve.deployment(ingress, **options)
    info = {"num_cpus_per_replica": cpus, "threads_per_replica": threads, "max_ongoing_requests": max_ongoing,
            "router": "Ray Serve default (power of two choices)", "planner_policy": ROUTER_POLICY}
    return deployment.bind(), info


# ---- Ray: connect, deploy, observe, stop ---------------------------------------------------------------------

def connect(address: str | None = None, num_cpus: int | None = None):
    """`ray.init` on `address` (a running cluster, or "auto"), else a new local Ray that lives as long as this
    process. Returns the context; never joins a cluster someone else started unless `address` says so."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at nice 15 by default; a replica is the work here, so it competes on equal terms with
    # the load generator and whatever else the node runs (applies to a Ray this process starts).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Serve's driver-side INFO lines ("Connecting to existing Serve app ... http_options will not be applied",
    # printed because we start Serve with our port before `serve.run`) mislead more than they tell.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        return ray.init(address=address, **kwargs)
    # Small object store: replicas pass HTTP bodies, not tensors. "local" never joins another user's cluster.
    return ray.init(address="local", num_cpus=num_cpus, object_store_memory=200 * 2**20, **kwargs)


def deploy(spec: FleetSpec, timeout_s: float = 600.0) -> dict:
    """Deploy `spec` on the connected Ray cluster and wait until every replica answers; returns what was run."""
    import ray
    from ray import serve

    cluster_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=None)
    app, info = build_application(spec, cluster_cpus, node_cpus or None)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # see connect(); serve.start resets it
    start = time.monotonic()
    serve.run(app, name=spec.app_name, route_prefix="/", blocking=False)
    url = f"http://{_client_host(spec.host)}:{spec.port}"
    wait_ready(url, spec.app_name, timeout_s - (time.monotonic() - start))
    return {**info, "url": url, "app_name": spec.app_name, "replicas": spec.replicas,
            "autoscale": None if spec.autoscale is None else spec.autoscale.to_config(),
            "cluster_cpus": cluster_cpus, "startup_s": time.monotonic() - start}


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


def wait_ready(url: str, app_name: str = DEFAULT_APP_NAME, timeout_s: float = 300.0) -> None:
    """Until the deployment is RUNNING and the proxy routes /v1/models to it."""
    import httpx
    from ray import serve

    deadline = time.monotonic() + max(1.0, timeout_s)
    last = "no answer yet"
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and str(app.status).endswith("RUNNING"):
            try:
                r = httpx.get(f"{url}/v1/models", timeout=5.0)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}"
        elif app is not None:
            last = f"application {app_name} is {app.status}: {app.message or ''}".strip()
        time.sleep(0.5)
    raise RuntimeError(f"the fleet at {url} was not ready within {timeout_s:.0f} s ({last}); see the replica "
                       f"logs under the Ray session folder (/tmp/ray/session_latest/logs/serve)")


def replica_states(app_name: str = DEFAULT_APP_NAME) -> dict[str, int]:
    """{'RUNNING': 2, ...} for the pernode deployment of `app_name`; {} when there is none."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(k).rsplit(".", 1)[-1]: v for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


def shutdown(disconnect: bool = True) -> None:
    """Delete every Serve application, stop Serve's controller and proxies, then leave Ray (which ends a local
    Ray this process started)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if disconnect:
                ray.shutdown()


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


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1])


class LocalFleet:
    """A fleet on a local Ray started by (and ending with) this process: for `validate`, tests and scripts.

        with LocalFleet(spec) as fleet:
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="-").completions.create(...)
    """

    def __init__(self, spec: FleetSpec, num_cpus: int | None = None, timeout_s: float = 600.0):
        self.spec = spec
        self.num_cpus = num_cpus
        self.timeout_s = timeout_s
        self.info: dict = {}
        self.processes: set[int] = set()  # what the local Ray started, to check that stop() ends it all

    @property
    def url(self) -> str:
        return self.info["url"]

    def start(self) -> LocalFleet:
        before = child_processes()
        connect(None, self.num_cpus)
        try:
            self.info = deploy(self.spec, self.timeout_s)
        except BaseException:
            self.processes = child_processes() - before
            self.stop()
            raise
        self.processes = child_processes() - before
        return self

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """Shut Serve and Ray down and wait for the processes Ray started to end. Returns those still running."""
        shutdown()
        deadline = time.monotonic() + timeout_s
        left = still_running(self.processes)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = still_running(self.processes)
        return left

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_to_json(spec: FleetSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_json(d: dict) -> FleetSpec:
    d = dict(d)
    d["engine"] = EngineConfig(**d["engine"])
    d["settings"] = ServerSettings(**d["settings"])
    d["autoscale"] = Autoscale(**d["autoscale"]) if d.get("autoscale") else None
    return FleetSpec(**d)


def serve_until_signal(spec: FleetSpec, address: str | None = None, num_cpus: int | None = None,
                       startup_timeout_s: float = 600.0, state_file: Path | None = None) -> int:
    """Connect (or start a local Ray), deploy, serve until SIGINT/SIGTERM, then shut Serve and Ray down."""
    stop = threading.Event()
    before = child_processes()
    connect(address, num_cpus)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a logging handler of its own
        signal.signal(sig, lambda *_: stop.set())
    started: set[int] = set()
    try:
        info = deploy(spec, startup_timeout_s)
        started = child_processes() - before
        print(f"pernode fleet: {_describe(spec, info)}", flush=True)
        print(f"pernode fleet: OpenAI API at {info['url']}/v1 (Ray Serve's router; plan with --policy "
              f"{ROUTER_POLICY} to match it)", flush=True)
        if state_file is not None:
            state = {"pid": os.getpid(), "url": info["url"], "app_name": spec.app_name, "address": address,
                     "ray_processes": sorted(started), "info": info}
            state_file.write_text(json.dumps(state) + "\n")
        print("pernode fleet: serving until Ctrl-C or SIGTERM", flush=True)
        while not stop.wait(5.0):
            if not replica_states(spec.app_name):
                log.error("the Serve application %s is gone", spec.app_name)
                return 1
        print("pernode fleet: shutting down", flush=True)
        return 0
    finally:
        started |= child_processes() - before
        shutdown()
        _reap(started)


def _reap(pids: set[int], timeout_s: float = 20.0) -> None:
    """Wait for the processes a local Ray started to end, collecting our exited children as they go (an exiting
    parent would leave them as zombies under an init that may not reap)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not still_running(pids):
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """The owner of a detached local fleet: `python -m pernode.serve.deploy.ray_fleet SPEC.json` (see `_up_detached`)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # PR_SET_CHILD_SUBREAPER: Ray's grandchildren whose parent exits first come to us to be reaped
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    cfg = json.loads(Path(argv[0]).read_text())
    return serve_until_signal(spec_from_json(cfg["spec"]), None, cfg.get("num_cpus"), cfg["startup_timeout_s"],
                              state_file=STATE_FILE)


if __name__ == "__main__":
    sys.exit(main())
