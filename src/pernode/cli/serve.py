"""`pernode serve`: the OpenAI-compatible HTTP server over one engine."""
from __future__ import annotations

import argparse

from pernode import envs
from pernode.cli.options import add_engine_arguments, engine_config_from_args, parse_bytes
from pernode.serve.sampling.params import MAX_LOGPROBS
from pernode.serve.server.options import ServerSettings, read_api_key_file
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
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics (visible in "
                        "ps: prefer --api-key-file or $PERNODE_API_KEY; default: $PERNODE_API_KEY, else none)")
    g.add_argument("--api-key-file", default=None, help="read the API key from this file (once, stripped)")
    g.add_argument("--root-path", default="", help="the path prefix a proxy serves this server under")
    g.add_argument("--served-model-name", default=None, help="model id in the API (default: the model's name)")
    g.add_argument("--max-n", type=int, default=8, help="most choices per request (default %(default)s)")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help=f"most top logprobs per token, at most {MAX_LOGPROBS} (default %(default)s)")
    g.add_argument("--max-stop", type=int, default=8, help="most stop strings per request (default %(default)s)")
    g.add_argument("--max-stop-len", type=int, default=256,
                   help="most characters per stop string (default %(default)s)")
    g.add_argument("--max-stop-token-ids", type=int, default=64,
                   help="most stop token ids per request (default %(default)s)")
    g.add_argument("--max-seqs-per-request", type=int, default=256,
                   help="most sequences (prompts x n) per request (default %(default)s)")
    g.add_argument("--max-body-bytes", type=parse_bytes, default=1 << 20, help="largest request body (default 1MiB)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="waiting sequences (prompts x n) beyond which new requests get 429 (default %(default)s)")
    g.add_argument("--max-concurrent-requests", type=int, default=512,
                   help="HTTP requests in flight beyond which new ones get 429 before their body is read "
                        "(default %(default)s)")
    g.add_argument("--body-read-timeout", dest="body_read_timeout_s", type=float, default=30.0,
                   help="seconds a request body may take to arrive before 408 (default %(default)s)")
    g.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="browser origins (https://app.example) allowed to call this server, with CORS; '*' for any "
                        "(default: none, only same-origin)")
    g.add_argument("--allowed-hosts", nargs="*", default=[], metavar="HOST",
                   help="Host names accepted on a loopback connection besides localhost, 127.0.0.1 and [::1]; "
                        "'*' for any (default: none)")
    g.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish before aborting them "
                        "(default %(default)s)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level; debug also logs every request (default %(default)s)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    if args.api_key and args.api_key_file:
        raise ValueError("--api-key and --api-key-file are both given: give one, not both")
    api_key = args.api_key or (read_api_key_file(args.api_key_file) if args.api_key_file else envs.api_key())
    settings = ServerSettings(
        served_model_name=args.served_model_name, api_key=api_key,
        max_n=args.max_n, max_logprobs=args.max_logprobs, max_stop=args.max_stop, max_stop_len=args.max_stop_len,
        max_stop_token_ids=args.max_stop_token_ids, max_seqs_per_request=args.max_seqs_per_request,
        max_body_bytes=args.max_body_bytes, max_queued_requests=args.max_queued_requests,
        max_concurrent_requests=args.max_concurrent_requests, body_read_timeout_s=args.body_read_timeout_s,
        allowed_origins=tuple(args.allowed_origins), allowed_hosts=tuple(args.allowed_hosts),
        shutdown_timeout_s=args.shutdown_timeout_s)
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    return run_server(engine_config_from_args(args), settings_from_args(args), host=args.host, port=args.port,
                      log_level=args.log_level, root_path=args.root_path)
