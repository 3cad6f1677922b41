"""`pernode` command line: generate, chat, report (and the measurement, serving, shrinking and planning tools).

The only package that knows about argparse: each command's module adds its parser and maps flags to the library's
settings; library errors name settings (`kv_cache_bytes`), and `main` shows them as the flags that set them.
"""
from __future__ import annotations

import argparse
import logging
import re

from rich.console import Console
from rich.logging import RichHandler

from pernode.cli import (bench, distill, evaluate, fleet, frontier, generate, plan, profile, prune, quantize, report,
                         serve)

COMMANDS = (generate, profile, bench, plan, serve, fleet, report, quantize, prune, evaluate, frontier, distill)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pernode", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that `args` came from: `pernode fleet up` -> the `up` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return chosen_parser(action.choices[name], args)
    return parser


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """setting name -> the flag of this command that sets it (`kv_cache_bytes` -> `--kv-cache-bytes`)."""
    return {action.dest: max(action.option_strings, key=len) for action in parser._actions if action.option_strings}


def command_flags(*command: str) -> dict[str, str]:
    """`flags_of` the parser of `pernode COMMAND...`, e.g. command_flags("bench", "serve")."""
    parser = build_parser()
    for word in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return flags_of(parser)


def with_flags(message: str, flags: dict[str, str]) -> str:
    """A library message names settings; on the command line, name the flags (`max_num_seqs=0` -> `--max-num-seqs 0`)."""
    def flag(m: re.Match) -> str:
        name = m.group(1)
        return f"{flags[name]} {m.group(2)}" if name in flags else m.group(0)
    return re.sub(r"\b([a-z][a-z0-9_]*)=(\S+)", flag, message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # logs go to stderr so stdout carries only what the command produces (generated text, tables)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)])
    if not args.verbose:  # httpx logs one INFO line per request, which buries `bench serve`'s progress
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValueError as exc:  # user errors: one clear line, no traceback
        logging.getLogger("pernode").error("%s", with_flags(str(exc), flags_of(chosen_parser(parser, args))))
        return 2
