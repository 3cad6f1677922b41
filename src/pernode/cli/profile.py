"""`pernode profile`: the node's TPOT and throughput against batch, TTFT against prompt length, on the roofline."""
from __future__ import annotations

import argparse
import logging

from pernode.cli.options import add_engine_arguments, engine_config_from_args, int_list
from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.profile.profile_schema import save_profile
from pernode.measure.profile.profiler import print_profile, run_profile
from pernode.measure.report_html import write_report_html
from pernode.serve.engine.llm_engine import LLMEngine


def add_parsers(sub) -> None:
    p = sub.add_parser("profile", help="measure the node: TPOT/throughput vs batch, TTFT vs prompt, roofline")
    p.add_argument("--quick", action="store_true", help="a sweep of a minute or two")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--html", default=None, help="also write an HTML report here")
    p.add_argument("--batch-sizes", default=None, help="e.g. 1,2,4,8,16,32,64,128,256")
    p.add_argument("--prompt-lens", default=None, help="e.g. 64,128,256,512,1024,2048")
    p.add_argument("--context-len", type=int, default=None, help="context of the decode sweep, tokens")
    p.add_argument("--serve-results", nargs="*", help="bench serve JSON results to include (latency CDFs)")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    serve_runs = [BenchResult.load(path).to_dict() for path in args.serve_results or ()]  # fail before measuring
    engine = LLMEngine(engine_config_from_args(args))
    profile = run_profile(engine, quick=args.quick, batch_sizes=int_list(args.batch_sizes),
                          prompt_lens=int_list(args.prompt_lens), context_len=args.context_len)
    profile["serve_runs"].extend(serve_runs)
    save_profile(args.out, profile)
    print_profile(profile)
    if args.html:
        write_report_html(args.html, profile)
    logging.getLogger("pernode").info("profile written to %s%s", args.out, f" and {args.html}" if args.html else "")
    return 0
