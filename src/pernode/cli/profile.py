"""`pernode profile`: the node's TPOT and throughput against batch, TTFT against prompt length, on the roofline."""
from __future__ import annotations

import argparse
import gc
import logging

from pernode.cli.options import add_engine_arguments, engine_config_from_args, int_list
from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.profile.profile_schema import load_profile, save_profile
from pernode.measure.profile.profiler import print_profile, run_profile
from pernode.measure.profile.serving_path import measure_serving_path
from pernode.measure.profile.serving_path_servers import pernode_serve, ray_serve, server_cpu_s
from pernode.measure.profile.serving_path_streams import (DEFAULT_STREAMS, PATHS as SERVING_PATHS, measure_streams,
                                                          parse_streams)
from pernode.measure.report_html import write_report_html
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.kernels.gemm_dispatch import forget_cached_crossovers


def add_parsers(sub) -> None:
    p = sub.add_parser("profile", help="measure the node: TPOT/throughput vs batch, TTFT vs prompt, roofline")
    p.add_argument("--quick", action="store_true", help="a sweep of a minute or two")
    p.add_argument("--remeasure-kernels", action="store_true",
                   help="measure the GEMV/GEMM crossovers of quantized layers again (a quiet machine gives the best "
                        "values) and replace the cached ones")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--html", default=None, help="also write an HTML report here")
    p.add_argument("--batch-sizes", default=None, help="e.g. 1,2,4,8,16,32,64,128,256")
    p.add_argument("--prompt-lens", default=None, help="e.g. 64,128,256,512,1024,2048")
    p.add_argument("--context-len", type=int, default=None, help="context of the decode sweep, tokens")
    p.add_argument("--prefill-passes", type=int, default=None,
                   help="passes over the prompt lengths, the median per length kept (default 3; --quick 1)")
    p.add_argument("--decode-passes", type=int, default=None,
                   help="passes over the batch sizes, the median per batch size kept (default 3; --quick 1)")
    p.add_argument("--serve-results", nargs="*", help="bench serve JSON results to include (latency CDFs)")
    p.add_argument("--serving-path", nargs="?", const="serve", default=None, choices=SERVING_PATHS,
                   help="also measure HTTP, tokenizing and streaming per request and per token, on loopback with "
                        "the same engine flags (the planner adds them): `serve` (the default) against `pernode "
                        "serve`, `ray` through Ray Serve's proxy into one replica pinned to this process's cores "
                        "(the path `fleet validate` and `fleet up` serve by), at several concurrent streams")
    p.add_argument("--serving-path-streams", default=None,
                   help="concurrent streams to measure the path at, e.g. 1,2,4,8 (default for `ray`: 1,2,4,8; "
                        "for `serve`: one request at a time, paired as before)")
    p.add_argument("--serving-path-rounds", type=int, default=6,
                   help="paired rounds per stream count with --serving-path-streams or `ray` (default 6, after 1 "
                        "warm-up round)")
    p.add_argument("--serving-path-prompt-len", type=int, default=64,
                   help="prompt tokens of each stream with --serving-path-streams or `ray` (default 64)")
    p.add_argument("--serving-path-into", default=None, metavar="PROFILE.json",
                   help="skip the sweep: read this profile, measure only --serving-path (with this command's engine "
                        "flags, which should be the profile's) and write the profile with that section to --out")
    p.add_argument("--serving-path-output-len", type=int, default=32,
                   help="output tokens of each stream with --serving-path-streams or `ray` (default 32)")
    p.add_argument("--serving-path-requests", type=int, default=12,
                   help="prompts for --serving-path, each sent straight into the engine and over HTTP, alternating "
                        "(default 12 pairs, after 2 warm-up pairs)")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags given on this command line, to start `pernode serve` with the same engine."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(parser)
    flags = []
    for action in parser._actions:
        if not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        flags += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return flags


def _measure_path(args: argparse.Namespace, engine: LLMEngine, warm_prefill: list | None) -> dict:
    """The profile's serving_path section for the path asked for."""
    streams = parse_streams(args.serving_path_streams) if args.serving_path_streams else None
    if args.serving_path == "serve" and streams is None:
        return measure_serving_path(engine, engine_flags(args), num_pairs=args.serving_path_requests)
    bring_up = (ray_serve(engine_config_from_args(args)) if args.serving_path == "ray"
                else pernode_serve(engine_flags(args)))
    with bring_up as path:
        print(f"serving path ({args.serving_path}): up at {path.url}; {path.layout}", flush=True)
        return measure_streams(engine, path.url, args.serving_path, streams or DEFAULT_STREAMS,
                               args.serving_path_rounds, args.serving_path_prompt_len, args.serving_path_output_len,
                               path.client_cores, path.layout,
                               server_cpu=lambda: server_cpu_s(path.server_pids), warm_prefill=warm_prefill)


def run(args: argparse.Namespace) -> int:
    serve_runs = [BenchResult.load(path).to_dict() for path in args.serve_results or ()]  # fail before measuring
    if args.remeasure_kernels:
        forget_cached_crossovers()  # the engine's load measures every layer shape again
    if args.serving_path_streams:  # bad input fails before minutes of measuring
        parse_streams(args.serving_path_streams)
    for name, low in (("serving_path_rounds", 1), ("serving_path_prompt_len", 1), ("serving_path_output_len", 2)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: allowed >= {low}")
    if args.serving_path_into and not args.serving_path:
        raise ValueError("--serving-path-into needs --serving-path serve|ray: it measures only that")
    base = load_profile(args.serving_path_into) if args.serving_path_into else None  # fail before measuring
    engine = LLMEngine(engine_config_from_args(args))
    if base is not None:
        profile = base
    else:
        profile = run_profile(engine, quick=args.quick, batch_sizes=int_list(args.batch_sizes),
                              prompt_lens=int_list(args.prompt_lens), context_len=args.context_len,
                              prefill_passes=args.prefill_passes, decode_passes=args.decode_passes)
    profile["serve_runs"].extend(serve_runs)
    if args.serving_path:  # paired against this engine: both halves of a pair see the same machine
        # the idle-start cost needs prefill points timed in this same run, on this machine as it is now
        profile["serving_path"] = _measure_path(args, engine, None if base is not None else profile.get("prefill"))
    del engine
    gc.collect()
    save_profile(args.out, profile)
    print_profile(profile)
    if "serving_path" in profile:
        sp = profile["serving_path"]
        print(f"serving path ({sp.get('path', 'serve')}: HTTP, tokenizing, streaming; {sp['pairs']} paired "
              f"{'rounds' if 'streams' in sp else 'requests'}, load {sp['load_avg_1m'][0]:.2f}-"
              f"{sp['load_avg_1m'][1]:.2f}): +{sp['request_s'] * 1000:.1f} ms per request, "
              f"+{sp.get('step_s', 0.0) * 1000:.2f} ms per step + {sp['token_s'] * 1000:.2f} ms per token of each "
              f"running stream")
        for line in sp["notes"]:
            print(f"  {line}")
    if args.html:
        write_report_html(args.html, profile)
    logging.getLogger("pernode").info("profile written to %s%s", args.out, f" and {args.html}" if args.html else "")
    return 0
