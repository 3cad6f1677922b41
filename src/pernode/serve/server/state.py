"""The server's state: loading, ready, draining or failed, and what it serves once the engine is attached."""
from __future__ import annotations

import asyncio
import enum
import logging
import time

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.async_engine import AsyncEngine
from pernode.serve.server.errors import APIError
from pernode.serve.server.metrics import ServerMetrics
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.serving import OpenAIServing

log = logging.getLogger("pernode.serve.server")


class ServerStatus(str, enum.Enum):
    """loading -> ready -> draining; failed if loading failed. Compares as the strings ("ready")."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class ServerState:
    """The server's lifecycle and what it serves once loaded. The engine loop's death shows as not ready
    (/health: "dead")."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.status = ServerStatus.LOADING
        self.load_error: str | None = None
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.metrics: ServerMetrics | None = None
        self.served_names: tuple[str, ...] = ()
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.status is ServerStatus.READY and self.async_engine is not None and not self.async_engine.dead

    def health(self) -> str:
        if self.async_engine is not None and self.async_engine.dead:
            return "dead"
        return "ok" if self.status is ServerStatus.READY else self.status.value

    def attach(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        """Serve `engine`: start its thread, metrics and the OpenAI handlers; ready unless draining already."""
        s = self.settings
        names = [s.served_model_name or engine.model_config.name, engine.config.model, engine.model_config.name]
        self.served_names = tuple(dict.fromkeys(names))
        self.engine = engine
        self.metrics = ServerMetrics(self.served_names[0])
        self.async_engine = AsyncEngine(engine, s.max_queued_requests, self.metrics)
        self.metrics.attach(self.async_engine)
        self.async_engine.start(loop)
        self.serving = OpenAIServing(self.async_engine, self.served_names, s)  # its per-request limits
        if self.status is ServerStatus.LOADING:
            self.status = ServerStatus.READY

    def serving_or_503(self) -> OpenAIServing:
        if self.serving is None or not self.ready:
            reason = {ServerStatus.LOADING: "the model is still loading; retry in a few seconds",
                      ServerStatus.DRAINING: "the server is shutting down and takes no new requests",
                      ServerStatus.FAILED: f"the model failed to load ({self.load_error})"}.get(self.status)
            if self.async_engine is not None and self.async_engine.dead:
                reason = f"the engine stopped ({self.async_engine.dead_reason}); restart the server"
            raise APIError(503, reason or "the server is not ready", code="unavailable",
                           headers={"Retry-After": "1"} if self.status is ServerStatus.LOADING else None)
        return self.serving

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting, let requests in flight finish for up to `timeout_s`, abort the rest."""
        self.status = ServerStatus.DRAINING
        e = self.async_engine
        if e is None:
            return
        e.accepting = False
        if e.num_in_flight:
            log.info("draining: %d requests in flight, waiting up to %.0f s", e.num_in_flight, timeout_s)
        if not await e.wait_idle(timeout_s):
            log.info("draining: aborting %d requests still in flight", e.num_in_flight)
            e.abort_all()
            await e.wait_idle(10.0)

    def fail(self, message: str) -> None:
        self.status, self.load_error = ServerStatus.FAILED, message

    def close(self) -> None:
        if self.async_engine is not None:
            self.async_engine.shutdown()
