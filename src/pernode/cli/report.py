"""`pernode report`: the main job, end to end, into one HTML report."""
from __future__ import annotations

import argparse

from pernode.cli.options import add_engine_arguments, engine_config_from_args
from pernode.jobs.report import run_report


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="the main job: measure the node and write an HTML report")
    p.add_argument("--quick", action="store_true", help="a run of a couple of minutes")
    p.add_argument("--out", default="pernode-report", help="output folder")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_report(engine_config_from_args(args), out_dir=args.out, quick=args.quick)
