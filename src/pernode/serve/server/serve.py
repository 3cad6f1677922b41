"""Running the app: `pernode serve` (signals, graceful drain) and `ServerThread` (in-process, for tests and tools).

SIGTERM or Ctrl-C: stop admitting (503), let requests in flight finish for up to shutdown_timeout_s, abort the
rest (finish_reason "abort"), then exit 0. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
import time

import uvicorn

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.http_protocol import with_head_deadline
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.state import ServerStatus

log = logging.getLogger("pernode.serve.server")


def describe_engine(engine: LLMEngine) -> str:
    """The startup line: what is served, how, and how much KV capacity that leaves."""
    dtype = str(engine.dtype).removeprefix("torch.")
    tokens = engine.num_blocks * engine.block_size
    gib = tokens * engine.kv_bytes_per_token / 2**30
    return (f"model {engine.model_config.name} ({dtype} on {engine.device}); KV cache {engine.num_blocks} blocks x "
            f"{engine.block_size} tokens = {tokens} tokens ({gib:.2f} GiB, {engine.kv_bytes_per_token} bytes/token); "
            f"max concurrent sequences at max_model_len {engine.max_model_len}: {engine.max_concurrent_seqs:.1f}")


class _DrainingServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM/SIGINT draining the engine instead of dropping connections."""

    def __init__(self, config: uvicorn.Config, app, shutdown_timeout_s: float):
        super().__init__(config)
        self.app = app
        self.shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit code be 143.
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        log.info("%s: draining (up to %.0f s), then exiting", signal.Signals(sig).name, self.shutdown_timeout_s)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.app.state.server.drain(self.shutdown_timeout_s)
        finally:
            self.should_exit = True


def run_server(engine_config: EngineConfig, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", root_path: str = "") -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain, 1 if the model failed to load."""
    settings.validate()
    server: _DrainingServer | None = None

    def ready(engine: LLMEngine) -> None:
        # The engine lives as long as this process: move it and the imports (~300k objects) out of the cyclic
        # collector's scans, which took 5-8% of a batch-1 decode step (perf). Only here: a process that builds
        # engines one after another would keep every frozen one alive.
        gc.collect()
        gc.freeze()
        print(f"pernode serve: {describe_engine(engine)}", flush=True)
        print(f"pernode serve: ready on http://{host}:{port} (OpenAI API under /v1, model "
              f"{settings.served_model_name or engine.model_config.name!r})", flush=True)

    def load_failed(message: str) -> None:  # already logged; nothing to serve
        server.should_exit = True

    app = build_app(engine_config, settings, on_ready=ready, on_load_failed=load_failed)
    print(f"pernode serve: loading {engine_config.model} (GET /health answers 503 until ready)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level == "debug", root_path=root_path,
                            http=with_head_deadline(settings.body_read_timeout_s))  # the head's deadline
    server = _DrainingServer(config, app, settings.shutdown_timeout_s)
    server.run()
    return 1 if app.state.server.status is ServerStatus.FAILED else 0


class ServerThread:
    """The app on a free loopback port, in a background thread (no signal handling): for tests and tools.

        with ServerThread(build_app(engine)) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, root_path: str = ""):
        self.app = app
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        state = getattr(app.state, "server", None)  # a plain app mounting ours has none: the default deadline
        head_timeout_s = state.settings.body_read_timeout_s if state is not None else ServerSettings.body_read_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                                                    root_path=root_path, http=with_head_deadline(head_timeout_s)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="pernode-server")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

