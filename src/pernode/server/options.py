"""The server's own settings and their `pernode serve` flags (light: no FastAPI or torch imports here)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from pernode.sampling.params import MAX_LOGPROBS


@dataclass
class ServerSettings:
    """What `pernode serve` adds to the engine's own configuration."""

    served_model_name: str | None = None  # default: the model's name
    api_key: str | None = None  # /v1 routes need `Authorization: Bearer KEY` when set
    max_n: int = 8
    max_logprobs: int = 20
    max_stop: int = 8
    max_body_bytes: int = 1 << 20
    max_queued_requests: int = 256
    shutdown_timeout_s: float = 30.0

    def validate(self) -> None:
        checks = [("--max-n", self.max_n, 1, None), ("--max-logprobs", self.max_logprobs, 0, MAX_LOGPROBS),
                  ("--max-stop", self.max_stop, 0, None), ("--max-body-bytes", self.max_body_bytes, 1, None),
                  ("--max-queued-requests", self.max_queued_requests, 1, None),
                  ("--shutdown-timeout", self.shutdown_timeout_s, 0, None)]
        for name, value, low, high in checks:
            if value < low or (high is not None and value > high):
                allowed = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} {value} is out of range: allowed {allowed}")


def _size(text: str) -> int:
    from pernode.cli import parse_bytes

    return parse_bytes(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $PERNODE_API_KEY, else none)")
    g.add_argument("--served-model-name", default=None, help="model id in the API (default: the model's name)")
    g.add_argument("--max-n", type=int, default=8, help="most choices per request (default %(default)s)")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help=f"most top logprobs per token, at most {MAX_LOGPROBS} (default %(default)s)")
    g.add_argument("--max-stop", type=int, default=8, help="most stop strings per request (default %(default)s)")
    g.add_argument("--max-body-bytes", type=_size, default=1 << 20, help="largest request body (default 1MiB)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="waiting requests beyond which new ones get 429 (default %(default)s)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish before aborting them "
                        "(default %(default)s)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level; debug also logs every request (default %(default)s)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    settings = ServerSettings(
        served_model_name=args.served_model_name, api_key=args.api_key or os.environ.get("PERNODE_API_KEY") or None,
        max_n=args.max_n, max_logprobs=args.max_logprobs, max_stop=args.max_stop, max_body_bytes=args.max_body_bytes,
        max_queued_requests=args.max_queued_requests, shutdown_timeout_s=args.shutdown_timeout)
    settings.validate()
    return settings
