"""`pernode plan`: read a profile, describe the workload and SLO, print the fleet and its bill.

Exit status: 0 a fleet meets the SLO, 1 none does up to --max-replicas, 2 the input was invalid.
Each flag's dest is the library setting it sets, so a library error (`headroom=1.0: ...`) is shown with the flag.
"""
from __future__ import annotations

import argparse
import re
from typing import Callable

from rich.console import Console
from tokenizers import Tokenizer

from pernode.measure.profile.projection import project_profile
from pernode.price.planner import plan
from pernode.price.pricing import PRICES
from pernode.price.report import plot_plan, render_plan
from pernode.price.simulator import POLICIES
from pernode.price.workload import LengthDist, Workload
from pernode.records import read_json
from pernode.slo import SLO


def add_parsers(sub) -> None:
    p = sub.add_parser("plan", help="replicas and cost for a workload under latency SLOs, from a profile")
    add_arguments(p)
    p.set_defaults(func=run_plan)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile.json written by `pernode profile`")
    parser.add_argument("--rate", dest="rate_rps", type=float, required=True,
                        help="mean request rate, requests per second (> 0)")
    parser.add_argument("--input-len", help="prompt tokens: N or LO:HI (uniform); ignored with --trace")
    parser.add_argument("--output-len", help="output tokens: N or LO:HI (uniform); ignored with --trace")
    parser.add_argument("--trace", help="JSONL with prompt_tokens/output_tokens, or prompt/max_tokens, per line")
    parser.add_argument("--tokenizer", help="tokenizer.json to count --trace prompts exactly "
                                            "(default: 4 characters a token)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of inter-arrival times: 1 Poisson, < 1 burstier (default 1)")
    parser.add_argument("--slo", required=True, help="latency limits in ms, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=20000")
    parser.add_argument("--attainment", dest="attainment_target", type=float, default=0.99,
                        help="fraction of requests that must meet every SLO, in (0, 1] (default 0.99)")
    parser.add_argument("--price-per-hour", dest="price_per_node_hour", type=float,
                        help="USD per node-hour (one replica's node); wins over --instance")
    parser.add_argument("--instance", choices=sorted(PRICES), help="take the node-hour price from the built-in table")
    parser.add_argument("--headroom", type=float, default=0.0,
                        help="keep utilisation below 1 - headroom, in [0, 1) (default 0)")
    parser.add_argument("--policy", choices=POLICIES, default="least_outstanding", help="load balancer")
    parser.add_argument("--num-requests", type=int, default=4000, help="simulated requests per fleet size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated trace")
    parser.add_argument("--interval-seeds", type=int, default=5,
                        help="seeded traces the chosen fleet is simulated on for its latency ranges (default 5)")
    parser.add_argument("--token-budget", type=int, default=2048, help="tokens one replica schedules per step")
    parser.add_argument("--max-replicas", type=int, help="largest fleet to try (default max(64, 16 x first guess))")
    parser.add_argument("--replicas", type=int, help="evaluate a fleet of exactly this size instead of searching")
    parser.add_argument("--project", metavar="ACCELERATOR",
                        help="first project the (measured) profile onto a published accelerator by the roofline, "
                             "e.g. 'H200 SXM' (see measure/accelerators.py); the plan is labelled projected")
    parser.add_argument("--out", help="write the plan as JSON here")
    parser.add_argument("--plot", help="write a PNG of cost and attainment against replicas here")


def _flags_by_setting() -> dict[str, str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


FLAGS_BY_SETTING = _flags_by_setting()


def with_flags(message: str) -> str:
    """`rate_rps=-1.0: ...` -> `--rate -1.0: ...`: the library names settings, the user typed flags."""
    def flag(m: re.Match) -> str:
        name = m.group(1)
        return f"{FLAGS_BY_SETTING[name]} {m.group(2)}" if name in FLAGS_BY_SETTING else m.group(0)
    return re.sub(r"\b([a-z][a-z0-9_]*)=(\S+)", flag, message)


def _tokenizer_counter(path: str) -> Callable[[str], int]:
    tok = Tokenizer.from_file(path)
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _build_workload(args: argparse.Namespace) -> Workload:
    if args.trace:
        count = _tokenizer_counter(args.tokenizer) if args.tokenizer else None
        return Workload.from_trace(args.trace, args.rate_rps, args.burstiness, count)
    if not args.input_len or not args.output_len:
        raise ValueError("--input-len and --output-len are required without --trace (N or LO:HI tokens, "
                         "e.g. --input-len 128:512 --output-len 64:256)")
    return Workload(args.rate_rps, LengthDist.parse(args.input_len, "input_len"),
                    LengthDist.parse(args.output_len, "output_len"), args.burstiness)


def _read_profile(path: str) -> dict:
    profile = read_json(path, "--profile")
    if not isinstance(profile, dict):
        raise ValueError(f"--profile {path}: expected a JSON object (see docs/profile_schema.md)")
    return profile


def run_plan(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        slo = SLO.parse(args.slo)
        workload = _build_workload(args)
        profile = _read_profile(args.profile)
        if getattr(args, "project", None):
            profile = project_profile(profile, args.project)
        result = plan(profile, workload, slo, args.price_per_node_hour, headroom=args.headroom, policy=args.policy,
                      attainment_target=args.attainment_target, instance=args.instance,
                      num_requests=args.num_requests, seed=args.seed, token_budget=args.token_budget,
                      max_replicas=args.max_replicas, interval_seeds=args.interval_seeds, replicas=args.replicas)
    except (ValueError, OSError) as e:
        err.print(f"[red]pernode plan: {with_flags(str(e))}[/red]")
        return 2
    render_plan(result)
    if args.out:
        result.save(args.out)
    if args.plot and result.curve:
        plot_plan(result, args.plot)
    return 0 if result.feasible else 1
