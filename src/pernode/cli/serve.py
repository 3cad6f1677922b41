"""`pernode serve`: the OpenAI-compatible HTTP server over one engine."""
from __future__ import annotations

import argparse

from pernode import envs
from pernode.cli.options import add_engine_arguments, engine_config_from_args, parse_bytes
from pernode.serve.sampling.params import MAX_LOGPROBS
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.serve import run_server


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, metrics)")
    add_server_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=run)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--max-body-bytes", type=parse_bytes, default=1 << 20, help="largest request body (default 1MiB)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="waiting requests beyond which new ones get 429 (default %(default)s)")
    g.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish before aborting them "
                        "(default %(default)s)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level; debug also logs every request (default %(default)s)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    settings = ServerSettings(
        served_model_name=args.served_model_name, api_key=args.api_key or envs.api_key(),
        max_n=args.max_n, max_logprobs=args.max_logprobs, max_stop=args.max_stop, max_body_bytes=args.max_body_bytes,
        max_queued_requests=args.max_queued_requests, shutdown_timeout_s=args.shutdown_timeout_s)
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    return run_server(engine_config_from_args(args), settings_from_args(args), host=args.host, port=args.port,
                      log_level=args.log_level)
