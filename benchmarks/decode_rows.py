"""Decode step time at each batch size under kernel settings given as environment variables, the variants run in
turn, round after round, so that the node's drift falls on all of them alike.

Each variant is a fresh process (the kernel choices are read at load) on --threads threads (default 1), pinned with
--cpu, timing --steps synthetic decode steps per batch size at --context tokens, three passes over the batch sizes,
the median kept. Prints each round's medians and, per batch size, each variant's median over rounds against the first's.

    PYTHONPATH=src python benchmarks/decode_rows.py --batch-sizes 1,2,3,4,5,6,7,8,9,12 --rounds 2 \\
        --variant panel9=PERNODE_PANEL_FROM_ROWS=9 --variant panel4=PERNODE_PANEL_FROM_ROWS=4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(model: str, batch_sizes: list[int], context: int, steps: int, threads: int) -> None:
    from pernode.config import EngineConfig
    from pernode.serve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_threads=threads, kv_cache_bytes=1 << 30))
    samples: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for seed in range(3):
        for b in batch_sizes:
            times = engine.time_decode_steps(b, context, steps, seed)
            samples[b].append(statistics.median(times[1:]))
    print(json.dumps({b: statistics.median(v) for b, v in samples.items()}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-sizes", default="1,2,3,4,5,6,7,8,9,12")
    ap.add_argument("--context", type=int, default=92)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu", default="0", help="core(s) to pin each variant to (taskset); '' for none")
    ap.add_argument("--threads", type=int, default=1, help="engine threads (pin to as many cores with --cpu)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VAR=VALUE[,VAR=VALUE]",
                    help="a name and the environment it runs with; repeatable (default: one variant, as set)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.child:
        child(args.model, batch_sizes, args.context, args.steps, args.threads)
        return 0
    variants = []
    for item in args.variant or ["as-set="]:
        name, _, assignments = item.partition("=")
        env = dict(kv.split("=", 1) for kv in assignments.split(",") if kv)
        variants.append((name, env))
    pin = ["taskset", "-c", args.cpu] if args.cpu else []
    results: dict[str, list[dict[int, float]]] = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        for name, env in variants:
            out = subprocess.run([*pin, sys.executable, __file__, "--child", "--model", args.model, "--batch-sizes",
                                  args.batch_sizes, "--context", str(args.context), "--steps", str(args.steps),
                                  "--threads", str(args.threads)],
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **env}, check=True,
                                 capture_output=True,
                                 text=True)
            got = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
            results[name].append(got)
            print(f"round {r + 1} {name}: " + " ".join(f"{b}:{got[b] * 1e3:.1f}" for b in batch_sizes), flush=True)
    first = variants[0][0]
    print("\n| batch | " + " | ".join(f"{name} ms" for name, _ in variants) + " | "
          + " | ".join(f"{name} / {first}" for name, _ in variants[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(variants) - 1))
    for b in batch_sizes:
        med = {name: statistics.median(run[b] for run in runs) for name, runs in results.items()}
        print(f"| {b} | " + " | ".join(f"{med[name] * 1e3:.1f}" for name, _ in variants) + " | "
              + " | ".join(f"{med[name] / med[first]:.2f}" for name, _ in variants[1:]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
