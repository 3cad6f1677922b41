"""One replica of the fleet: pernode's engine and OpenAI app as a Ray Serve deployment.

Each replica loads one `LLMEngine` and serves it through our own FastAPI app (`server.app.build_app`), mounted with
`serve.ingress`, so Ray Serve's HTTP proxy answers `/v1/completions`, `/v1/chat/completions` and `/v1/models`
exactly as `pernode serve` does.

Routing is Ray Serve's default, power of two choices on queue length (Mitzenmacher, "The Power of Two Choices in
Randomized Load Balancing", 2001): each request goes to the less loaded of two sampled replicas. With two replicas
that is join-the-shortest-queue; the planner's model of it is `least_outstanding` (ROUTER_POLICY).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass

import torch

from pernode.config import EngineConfig
from pernode.serve.deploy.cpuset import check_cpusets, claim_slot, pin_process
from pernode.serve.deploy.spec import FleetSpec
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.serve import describe_engine

ROUTER_POLICY = "least_outstanding"  # the planner's policy that models Ray Serve's default router
ROUTER = "Ray Serve default (power of two choices)"
REPLICA_HEADER = "x-pernode-replica"  # every response names the replica that served it
DEPLOYMENT_NAME = "pernode"
HEALTH_CHECK_PERIOD_S = 5.0


@dataclass(frozen=True)
class ReplicaResources:
    """What each replica was given: Ray CPUs, torch threads, and Ray's cap on the requests it holds."""

    num_cpus: float
    threads: int
    max_ongoing_requests: int
    cpuset_claim_dir: str | None = None  # where the replicas claimed their cpusets (`cpuset.claims`)


class ReplicaHeader:
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


def replica_id() -> str:
    from ray import serve  # lazy: Ray takes seconds to import

    try:
        ctx = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - outside a replica (tests of the builder): no id to give
        return f"pid-{os.getpid()}"
    rid = getattr(ctx, "replica_id", None)
    return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or rid or os.getpid())


def app_builder(engine: EngineConfig, settings: ServerSettings, threads: int,
                cpusets: list[tuple[int, ...]] | None = None, claim_dir: str | None = None):
    """The ASGI app factory Ray calls once in each replica's constructor: pin the replica to its cpuset when the
    spec gives them, load the engine on `threads` threads, then our OpenAI app around it (its lifespan warms the
    engine up before Ray marks the replica ready)."""

    def build_pernode_app():
        if cpusets:
            cores = cpusets[claim_slot(claim_dir, len(cpusets))]
            pin_process(cores)
            logging.getLogger("ray.serve").info("pernode replica pinned to cores %s", list(cores))
        torch.set_num_threads(threads)
        llm = LLMEngine(dataclasses.replace(engine, num_threads=threads))
        replica = replica_id()
        logging.getLogger("ray.serve").info("pernode replica %s: %s, %d torch threads", replica,
                                            describe_engine(llm), threads)
        app = build_app(llm, settings)
        app.add_middleware(ReplicaHeader, replica=replica)
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
    from ray import serve  # lazy: Ray takes seconds to import

    spec.settings.validate()
    cpus, threads = spec.resources(cluster_cpus, node_cpus)
    resources = ReplicaResources(cpus, threads, spec.replica_max_ongoing_requests)
    thread_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    options = dict(name=DEPLOYMENT_NAME, max_ongoing_requests=resources.max_ongoing_requests,
                   ray_actor_options={"num_cpus": cpus,
                                      "runtime_env": {"env_vars": {**thread_env, "TOKENIZERS_PARALLELISM": "false"}}},
                   health_check_period_s=HEALTH_CHECK_PERIOD_S,
                   graceful_shutdown_timeout_s=spec.settings.shutdown_timeout_s)
    if spec.autoscale is not None:
        options["autoscaling_config"] = spec.autoscale.to_config()
    else:
        options["num_replicas"] = spec.replicas
    cpusets = check_cpusets(spec.cpusets, spec.replicas) if spec.cpusets else None
    claim_dir = tempfile.mkdtemp(prefix="pernode-cpusets-") if cpusets else None
    ingress = serve.ingress(app_builder(spec.engine, spec.settings, threads, cpusets, claim_dir))(PernodeReplica)
    deployment = serve.deployment(ingress, **options)
    return deployment.bind(), dataclasses.replace(resources, cpuset_claim_dir=claim_dir)
