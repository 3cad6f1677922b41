"""`pernode frontier`: each variant of the model profiled, planned for one workload and SLO, and priced beside its
perplexity increase; the Pareto frontier marked, and with --max-ppl-increase the cheapest setup within that budget.

Exit status: 0 done (and, with --max-ppl-increase, some variant qualifies), 1 none qualifies, 2 invalid input.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from pernode.cli.options import add_model_argument, parse_bytes
from pernode.jobs.frontier import (QUICK_VARIANTS, VARIANTS, FrontierSettings, default_variant_names,
                                   describe_choice, frontier_rows, path_variant, run_frontier, variants_named)
from pernode.measure.report_html import frontier_figure, save_figure_png
from pernode.price.frontier import Frontier, parse_fraction
from pernode.price.pricing import PRICES
from pernode.price.workload import LengthDist, Workload
from pernode.slo import SLO


def add_parsers(sub) -> None:
    p = sub.add_parser("frontier", help="$/M tokens vs perplexity for every checkpoint variant: the Pareto frontier")
    add_model_argument(p, "the base model every variant is made from")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all that can be made from the "
                        f"base model; --quick: {','.join(QUICK_VARIANTS)})")
    p.add_argument("--variant", dest="path_variants", action="append", default=[], metavar="NAME=PATH",
                   help="also measure the checkpoint folder PATH under NAME (e.g. distilled=out/student); repeatable")
    p.add_argument("--rounds", type=int, default=None,
                   help="profile every variant once per round, this many rounds, medians per point (default 3; "
                        "--quick 1); each round reloads each engine")
    p.add_argument("--baseline", default="fp32", help="the variant perplexity increases are measured against")
    p.add_argument("--rate", dest="rate_rps", type=float, default=2.0, help="mean request rate, req/s (default 2)")
    p.add_argument("--input-len", default="128:512", help="prompt tokens: N or LO:HI (default 128:512)")
    p.add_argument("--output-len", default="64:256", help="output tokens: N or LO:HI (default 64:256)")
    p.add_argument("--slo", default="ttft_ms=2000,tpot_ms=200", help="latency limits in ms (default "
                                                                     "ttft_ms=2000,tpot_ms=200)")
    p.add_argument("--price-per-hour", dest="price_per_node_hour", type=float, help="USD per node-hour")
    p.add_argument("--instance", choices=sorted(PRICES), default=None,
                   help="node-hour price from the built-in table (default aws-c7i.large without --price-per-hour)")
    p.add_argument("--max-ppl-increase", default=None,
                   help="quality budget vs the baseline, e.g. 5%% or 0.05: print the cheapest setup within it")
    p.add_argument("--project", metavar="ACCELERATOR",
                   help="plan on a published accelerator, each measured profile projected along the roofline "
                        "(labelled projected)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--kv-cache-bytes", type=parse_bytes, default=2**30,
                   help="the KV cache budget every variant gets (default 1GiB)")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--ppl-windows", type=int, default=None, help="perplexity windows of 512 tokens (default 2)")
    p.add_argument("--quick", action="store_true", help="few variants, short profiles, one perplexity window")
    p.add_argument("--checkpoints", default="frontier-checkpoints",
                   help="folder for the quantized checkpoints (reused when already there)")
    p.add_argument("--out", help="write the frontier as JSON here")
    p.add_argument("--plot", help="write the chart (perplexity vs $/M tokens, frontier marked) as PNG here")
    p.set_defaults(func=run_frontier_command)


def render_frontier(frontier: Frontier, console: Console) -> None:
    projected = any(p.profile_kind == "projected" for p in frontier.points)
    console.print(f"[bold]cost frontier{' (PROJECTED)' if projected else ''}[/bold]: {frontier.workload}; "
                  f"SLO {frontier.slo}; {frontier.price}")
    t = Table()
    for col in ("variant", "ppl", "Δ ppl", "KV B/token", "max batch", "replicas", "$/month", "$/M tok", "frontier"):
        t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")
    for p in sorted(frontier.points, key=lambda p: (p.cost, p.perplexity)):
        t.add_row(p.name, f"{p.perplexity:.3f}", f"{100 * p.ppl_increase:+.2f}%",
                  "–" if p.kv_bytes_per_token is None else f"{p.kv_bytes_per_token:,.0f}",
                  f"{p.max_batch} {p.batch_limited_by}" if p.max_batch is not None else "–",
                  str(p.replicas) if p.feasible else "none",
                  f"{p.cost_per_month_usd:,.0f}" if p.feasible else "–",
                  f"{p.cost_per_million_output_tokens_usd:.3f}" if p.feasible else "–",
                  "★" if p.on_frontier else "")
    console.print(t)
    for p in frontier.points:
        console.print(f"[dim]{p.name}: {p.description}[/dim]")
    for note in frontier.notes:
        console.print(f"[dim]- {note}[/dim]")


def run_frontier_command(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 132)  # a log file gets the whole table
    budget = parse_fraction(args.max_ppl_increase) if args.max_ppl_increase is not None else None
    extra = [path_variant(spec) for spec in args.path_variants]
    names = args.variants.split(",") if args.variants else list(
        QUICK_VARIANTS if args.quick else default_variant_names())
    names = [n.strip() for n in names if n.strip() and n.strip() not in {v.name for v in extra}]
    variants = variants_named(names) + extra
    workload = Workload(args.rate_rps, LengthDist.parse(args.input_len, "input_len"),
                        LengthDist.parse(args.output_len, "output_len"))
    slo = SLO.parse(args.slo)
    instance = args.instance or (None if args.price_per_node_hour is not None else "aws-c7i.large")
    settings = FrontierSettings.quick() if args.quick else FrontierSettings()
    overrides = {"device": args.device, "kv_cache_bytes": args.kv_cache_bytes, "num_threads": args.num_threads}
    if args.ppl_windows is not None:
        overrides["ppl_windows"] = args.ppl_windows
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    settings = replace(settings, **overrides)
    frontier, _ = run_frontier(args.model, variants, workload, slo, price_per_node_hour=args.price_per_node_hour,
                               instance=instance, settings=settings, checkpoints_dir=args.checkpoints,
                               project=args.project, baseline=args.baseline, progress=console.print)
    render_frontier(frontier, console)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(frontier.to_dict(), f, indent=1)
    if args.plot:
        title = "cost frontier" + (f" (projected to {args.project})" if args.project else "")
        save_figure_png(frontier_figure(frontier_rows(frontier), title), args.plot)
    if budget is None:
        return 0
    choice = frontier.cheapest_within(budget)
    console.print(f"[bold]{describe_choice(choice, budget)}[/bold]")
    return 0 if choice is not None else 1
