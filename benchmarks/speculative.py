"""Speculative decoding on the default model, measured in one run against the same engine without it:

- batch-1 TPOT with prompt lookup (n-gram) on an input-grounded workload (rewrite a stdlib function), target >= 1.5x;
- batch-1 TPOT with a draft model (the distilled student) on a chat workload, target >= 1.3x;
- throughput at concurrency 32 on the mixed workload, speculation on vs off, target: on never > 3% slower.

    PYTHONPATH=src .venv/bin/python benchmarks/speculative.py --quick
    PYTHONPATH=src .venv/bin/python benchmarks/speculative.py --draft /work/artifacts/draft --json spec.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pernode.config import DEFAULT_MODEL, EngineConfig, SpeculativeConfig
from pernode.jobs.speculative import measure_speculation


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default="/work/artifacts/draft", help="draft model path (skipped when missing)")
    p.add_argument("--eagle", default=None, help="EAGLE head folder (pernode draft-head) for the eagle proposer")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="2 prompts of 32 tokens at batch 1; 16 at the concurrency")
    p.add_argument("--skip-concurrency", action="store_true")
    p.add_argument("--proposers", default="off,ngram,draft", help="which of off,ngram,draft,eagle to run")
    p.add_argument("--workloads", default="chat,grounded", help="batch-1 workloads: chat,grounded")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.num_prompts, args.max_tokens = 2, 32
    config = EngineConfig(model=args.model, max_model_len=2048)
    proposers: dict[str, SpeculativeConfig | None] = {"off": None, "ngram": SpeculativeConfig("ngram", k=args.k)}
    if args.draft and os.path.exists(args.draft):
        proposers["draft"] = SpeculativeConfig("draft", k=args.k, draft_model=args.draft)
    else:
        print(f"draft model {args.draft!r} not found: the draft proposer is skipped", file=sys.stderr)
    if args.eagle:
        proposers["eagle"] = SpeculativeConfig("eagle", k=args.k, draft_model=args.eagle)
    proposers = {k: v for k, v in proposers.items() if k in args.proposers.split(",")}
    print(f"load average before: {load_average()}", flush=True)
    rows = measure_speculation(config, proposers, args.num_prompts, args.max_tokens,
                               workloads=tuple(args.workloads.split(",")))
    if not args.skip_concurrency:
        n = 16 if args.quick else args.concurrency
        rows += measure_speculation(config, proposers, n // 2, args.max_tokens, concurrency=n, workloads=("mixed",))
    print(f"load average after: {load_average()}")
    print(f"{'proposer':8s} {'workload':12s} {'TPOT ms':>8s} {'x TPOT':>7s} {'tok/s':>7s} {'x tok/s':>8s} "
          f"{'accept':>7s} {'mean len':>8s}")
    for r in rows:
        def f(v, spec):
            return format(v, spec) if v is not None else "-"
        print(f"{r.proposer:8s} {r.workload:12s} {r.tpot_ms:8.1f} {f(r.speedup_tpot, '7.2f')} "
              f"{r.output_tokens_per_s:7.1f} {f(r.speedup_throughput, '8.2f')} {f(r.acceptance_rate, '7.2f')} "
              f"{f(r.mean_acceptance_length, '8.2f')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_average": load_average(), "rows": [r.to_dict() for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
