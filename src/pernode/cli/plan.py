"""`pernode plan`: read a profile, describe the workload and SLO, print the fleet and its bill.

Exit status: 0 a fleet meets the SLO, 1 none does up to --max-replicas, 2 the input was invalid.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Callable

from rich.console import Console

from pernode.measure.profile.projection import project_profile
from pernode.price.planner import plan
from pernode.price.pricing import PRICES
from pernode.price.report import plot_plan, render_plan
from pernode.price.simulator import POLICIES
from pernode.slo import SLO
from pernode.price.workload import LengthDist, Workload


def add_parsers(sub) -> None:
    p = sub.add_parser("plan", help="replicas and cost for a workload under latency SLOs, from a profile")
    add_arguments(p)
    p.set_defaults(func=run_plan)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile.json written by `pernode profile`")
    parser.add_argument("--rate", type=float, required=True, help="mean request rate, requests per second (> 0)")
    parser.add_argument("--input-len", help="prompt tokens: N or LO:HI (uniform); ignored with --trace")
    parser.add_argument("--output-len", help="output tokens: N or LO:HI (uniform); ignored with --trace")
    parser.add_argument("--trace", help="JSONL with prompt_tokens/output_tokens, or prompt/max_tokens, per line")
    parser.add_argument("--tokenizer", help="tokenizer.json to count --trace prompts exactly "
                                            "(default: 4 characters a token)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of inter-arrival times: 1 Poisson, < 1 burstier (default 1)")
    parser.add_argument("--slo", required=True, help="latency limits in ms, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=20000")
    parser.add_argument("--attainment", type=float, default=0.99,
                        help="fraction of requests that must meet every SLO, in (0, 1] (default 0.99)")
    parser.add_argument("--price-per-hour", type=float, help="USD per node-hour (one replica's node); wins over "
                                                             "--instance")
    parser.add_argument("--instance", choices=sorted(PRICES), help="take the node-hour price from the built-in table")
    parser.add_argument("--headroom", type=float, default=0.0,
                        help="keep utilisation below 1 - headroom, in [0, 1) (default 0)")
    parser.add_argument("--policy", choices=POLICIES, default="least_outstanding", help="load balancer")
    parser.add_argument("--num-requests", type=int, default=4000, help="simulated requests per fleet size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated trace")
    parser.add_argument("--token-budget", type=int, default=2048, help="tokens one replica schedules per step")
    parser.add_argument("--max-replicas", type=int, help="largest fleet to try (default max(64, 16 x first guess))")
    parser.add_argument("--project", metavar="ACCELERATOR",
                        help="first project the (measured) profile onto a published accelerator by the roofline, "
                             "e.g. 'H200 SXM' (see measure/accelerators.py); the plan is labelled projected")
    parser.add_argument("--out", help="write the plan as JSON here")
    parser.add_argument("--plot", help="write a PNG of cost and attainment against replicas here")


def _tokenizer_counter(path: str) -> Callable[[str], int]:
    from tokenizers import Tokenizer  # optional: only for exact counts of raw-text traces

    tok = Tokenizer.from_file(path)
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _build_workload(args: argparse.Namespace) -> Workload:
    rate = args.rate
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"--rate = {rate!r}: must be a number of requests per second > 0")
    if args.trace:
        count = _tokenizer_counter(args.tokenizer) if args.tokenizer else None
        return Workload.from_trace(args.trace, rate, args.burstiness, count)
    if not args.input_len or not args.output_len:
        raise ValueError("--input-len and --output-len are required without --trace (N or LO:HI tokens, "
                         "e.g. --input-len 128:512 --output-len 64:256)")
    return Workload(rate, LengthDist.parse(args.input_len, "--input-len"),
                    LengthDist.parse(args.output_len, "--output-len"), args.burstiness)


def run_plan(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        if args.price_per_hour is None and args.instance is None:
            raise ValueError(f"give --price-per-hour USD or --instance NAME (one of {', '.join(sorted(PRICES))})")
        if not 0.0 < args.attainment <= 1.0:
            raise ValueError(f"--attainment = {args.attainment!r}: must lie in (0, 1], e.g. 0.99")
        if not 0.0 <= args.headroom < 1.0:
            raise ValueError(f"--headroom = {args.headroom!r}: must lie in [0, 1), e.g. 0.1 for 10% spare")
        if not (math.isfinite(args.burstiness) and args.burstiness > 0):
            raise ValueError(f"--burstiness = {args.burstiness!r}: must be > 0 (1 = Poisson)")
        if args.max_replicas is not None and args.max_replicas < 1:
            raise ValueError(f"--max-replicas = {args.max_replicas}: must be >= 1")
        slo = SLO.parse(args.slo)
        workload = _build_workload(args)
        try:
            with open(args.profile, encoding="utf-8") as f:
                profile = json.load(f)
        except OSError as e:
            raise ValueError(f"--profile {args.profile}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"--profile {args.profile}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(profile, dict):
            raise ValueError(f"--profile {args.profile}: expected a JSON object (see docs/profile_schema.md)")
        if getattr(args, "project", None):
            profile = project_profile(profile, args.project)
        result = plan(profile, workload, slo, args.price_per_hour, headroom=args.headroom, policy=args.policy,
                      attainment_target=args.attainment, instance=args.instance, num_requests=args.num_requests,
                      seed=args.seed, token_budget=args.token_budget, max_replicas=args.max_replicas)
    except (ValueError, OSError) as e:
        err.print(f"[red]pernode plan: {e}[/red]")
        return 2
    render_plan(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2, allow_nan=False)
            f.write("\n")
    if args.plot and result.curve:
        plot_plan(result, args.plot)
    return 0 if result.feasible else 1
