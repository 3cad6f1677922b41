"""A fleet's life on Ray: connect (or start a local Ray), deploy and wait until every replica answers, stop.

Ray is imported inside each function: it takes seconds to import, and `pernode` commands without a fleet never
need it.

A local Ray started here runs with Ray's token authentication (RAY_AUTH_MODE=token) and a fresh random token that
lives only in the environment of this process and the Ray processes it starts (never in ~/.ray/auth_token), no
dashboard, and Serve's HTTP proxy on loopback unless the spec says otherwise. Ray 2.60 still binds its gRPC
servers (GCS, raylet, workers) and agents on all interfaces and turns a 127.0.0.1 node address into the routable
one; the token is what keeps other hosts out of them.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

import httpx

from pernode.serve.deploy.processes import child_processes, wait_ended
from pernode.serve.deploy.replica import DEPLOYMENT_NAME, ROUTER, ROUTER_POLICY, build_application
from pernode.serve.deploy.spec import DEFAULT_APP_NAME, Autoscale, FleetSpec

log = logging.getLogger("pernode.fleet")

LOOPBACK = "127.0.0.1"
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_saved_auth_env: dict[str, str | None] | None = None  # what connect() replaced, restored by shutdown()


@dataclass(frozen=True)
class Deployment:
    """What `deploy` ran: where it answers, and what each replica got."""

    url: str
    app_name: str
    replicas: int
    autoscale: Autoscale | None
    num_cpus_per_replica: float
    threads_per_replica: int
    max_ongoing_requests: int
    cluster_cpus: float
    startup_s: float
    cpusets: tuple[str, ...] | None = None  # each replica's cores, when pinned
    cpuset_claim_dir: str | None = None

    def describe(self) -> str:
        return (f"{self.num_cpus_per_replica:g} CPUs and {self.threads_per_replica} torch threads each on "
                f"{self.cluster_cpus:g} cluster CPUs; up in {self.startup_s:.1f} s")

    def to_dict(self) -> dict:
        return {"num_cpus_per_replica": self.num_cpus_per_replica, "threads_per_replica": self.threads_per_replica,
                "max_ongoing_requests": self.max_ongoing_requests, "router": ROUTER, "planner_policy": ROUTER_POLICY,
                "url": self.url, "app_name": self.app_name, "replicas": self.replicas,
                "autoscale": None if self.autoscale is None else self.autoscale.to_config(),
                "cluster_cpus": self.cluster_cpus, "startup_s": self.startup_s,
                "cpusets": None if self.cpusets is None else list(self.cpusets),
                "cpuset_claim_dir": self.cpuset_claim_dir}

    @classmethod
    def from_dict(cls, d: dict) -> Deployment:
        return cls(url=d["url"], app_name=d["app_name"], replicas=int(d["replicas"]),
                   autoscale=None if d.get("autoscale") is None else Autoscale.from_config(d["autoscale"]),
                   num_cpus_per_replica=float(d["num_cpus_per_replica"]),
                   threads_per_replica=int(d["threads_per_replica"]),
                   max_ongoing_requests=int(d["max_ongoing_requests"]), cluster_cpus=float(d["cluster_cpus"]),
                   startup_s=float(d["startup_s"]),
                   cpusets=None if d.get("cpusets") is None else tuple(d["cpusets"]),
                   cpuset_claim_dir=d.get("cpuset_claim_dir"))


def describe_fleet(spec: FleetSpec, deployment: Deployment) -> str:
    return f"{spec.describe()}, {deployment.describe()}"


def connect(address: str | None = None, num_cpus: int | None = None):
    """`ray.init` on `address` (a running cluster, or "auto"), else a new local Ray that lives as long as this
    process. Returns the context; never joins a cluster someone else started unless `address` says so."""
    import ray  # lazy: Ray takes seconds to import

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
    init_kwargs, auth_env = local_ray_options(num_cpus)
    _set_auth_env(auth_env)
    try:
        return ray.init(**init_kwargs)
    except BaseException:
        _restore_auth_env()
        raise


def local_ray_options(num_cpus: int | None = None) -> tuple[dict, dict[str, str]]:
    """(ray.init arguments, environment) of a local Ray that only this user's processes can talk to: "local" never
    joins another user's cluster; no dashboard, and its host loopback were it started; a small object store
    (replicas pass HTTP bodies, not tensors); Ray's token authentication with a fresh 256-bit token, passed in the
    environment (read by Ray's processes only, /proc/PID/environ is private) so that it is never written to disk."""
    init_kwargs = dict(address="local", num_cpus=num_cpus, object_store_memory=200 * 2**20, include_dashboard=False,
                       dashboard_host=LOOPBACK, log_to_driver=False, configure_logging=False)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    return init_kwargs, env


def _set_auth_env(env: dict[str, str]) -> None:
    """Put a local Ray's auth settings in this process's environment (Ray's processes inherit it); the old values
    come back at shutdown()."""
    global _saved_auth_env
    if _saved_auth_env is None:
        _saved_auth_env = {k: os.environ.get(k) for k in RAY_AUTH_ENV}
    for k in RAY_AUTH_ENV:
        os.environ.pop(k, None)
    os.environ.update(env)
    _reload_ray_auth()


def _restore_auth_env() -> None:
    global _saved_auth_env
    if _saved_auth_env is None:
        return
    for k, v in _saved_auth_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_auth_env = None
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray see the auth environment as it is now: Ray reads RAY_AUTH_MODE into its config and
    caches the token when `ray` is imported, which is before connect() sets them (what Ray's own
    `_enable_token_auth` does)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # lazy: Ray takes seconds to import

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def disconnect() -> None:
    """Leave Ray without stopping Serve: its controller is a detached actor and keeps the replicas up."""
    import ray  # lazy: Ray takes seconds to import

    ray.shutdown()


def deploy(spec: FleetSpec, timeout_s: float = 600.0) -> Deployment:
    """Deploy `spec` on the connected Ray cluster and wait until every replica answers."""
    import ray  # lazy: Ray takes seconds to import
    from ray import serve

    cluster_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=None)
    app, resources = build_application(spec, cluster_cpus, node_cpus or None)
    warn_if_exposed(spec)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # see connect(); serve.start resets it
    start = time.monotonic()
    serve.run(app, name=spec.app_name, route_prefix="/", blocking=False)
    url = f"http://{_client_host(spec.host)}:{spec.port}"
    wait_ready(url, spec.app_name, timeout_s - (time.monotonic() - start), api_key=spec.settings.api_key)
    return Deployment(url=url, app_name=spec.app_name, replicas=spec.replicas, autoscale=spec.autoscale,
                      num_cpus_per_replica=resources.num_cpus, threads_per_replica=resources.threads,
                      max_ongoing_requests=resources.max_ongoing_requests, cluster_cpus=cluster_cpus,
                      startup_s=time.monotonic() - start, cpusets=spec.cpusets,
                      cpuset_claim_dir=resources.cpuset_claim_dir)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(spec: FleetSpec) -> bool:
    """Warn (and return True) when Serve's proxy would answer other hosts with no API key: anyone who reaches the
    port could then use the replicas. vLLM and llama.cpp serve without a key too, but say so here."""
    if is_loopback(spec.host) or spec.settings.api_key:
        return False
    log.warning("Serve's HTTP proxy listens on %s:%d without an API key: anyone who reaches that address can use "
                "the fleet; set api_key (PERNODE_API_KEY) or listen on 127.0.0.1", spec.host, spec.port)
    return True


def probe_models(url: str, api_key: str | None = None) -> str | None:
    """None when GET {url}/v1/models answers 200 (with the fleet's key, as a client sends it), else what it said."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=5.0)
    except httpx.HTTPError as e:
        return type(e).__name__
    return None if r.status_code == 200 else f"HTTP {r.status_code}"


def wait_ready(url: str, app_name: str = DEFAULT_APP_NAME, timeout_s: float = 300.0,
               api_key: str | None = None) -> None:
    """Until the deployment is RUNNING and the proxy routes /v1/models to it (sending `api_key` when it has one)."""
    from ray import serve  # lazy: Ray takes seconds to import

    deadline = time.monotonic() + max(1.0, timeout_s)
    last = "no answer yet"
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and str(app.status).endswith("RUNNING"):
            last = probe_models(url, api_key)
            if last is None:
                return
        elif app is not None:
            last = f"application {app_name} is {app.status}: {app.message or ''}".strip()
        time.sleep(0.5)
    raise RuntimeError(f"the fleet at {url} was not ready within {timeout_s:.0f} s ({last}); see the replica "
                       f"logs under the Ray session folder (/tmp/ray/session_latest/logs/serve)")


def replica_states(app_name: str = DEFAULT_APP_NAME) -> dict[str, int]:
    """{'RUNNING': 2, ...} for the pernode deployment of `app_name`; {} when there is none."""
    from ray import serve  # lazy: Ray takes seconds to import

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(k).rsplit(".", 1)[-1]: v for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


def delete_application(app_name: str) -> None:
    """Delete one Serve application; Serve and the cluster stay up."""
    from ray import serve  # lazy: Ray takes seconds to import

    serve.delete(app_name)


def shutdown() -> None:
    """Delete every Serve application, stop Serve's controller and proxies, then leave Ray (which ends a local
    Ray this process started)."""
    import ray  # lazy: Ray takes seconds to import
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            _restore_auth_env()


class LocalFleet:
    """A fleet on a local Ray started by (and ending with) this process: for `validate`, tests and scripts.

        with LocalFleet(spec) as fleet:
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="-").completions.create(...)
    """

    def __init__(self, spec: FleetSpec, num_cpus: int | None = None, timeout_s: float = 600.0):
        self.spec = spec
        self.num_cpus = num_cpus
        self.timeout_s = timeout_s
        self.deployment: Deployment | None = None
        self.processes: set[int] = set()  # what the local Ray started, to check that stop() ends it all

    @property
    def url(self) -> str:
        return self.deployment.url

    def start(self) -> LocalFleet:
        before = child_processes()
        connect(None, self.num_cpus)
        try:
            self.deployment = deploy(self.spec, self.timeout_s)
        except BaseException:
            self.processes = child_processes() - before
            self.stop()
            raise
        self.processes = child_processes() - before
        return self

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """Shut Serve and Ray down and wait for the processes Ray started to end. Returns those still running."""
        shutdown()
        return wait_ended(self.processes, timeout_s)

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
