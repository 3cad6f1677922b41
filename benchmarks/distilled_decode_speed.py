"""Decode speed and held-out perplexity of smaller models against their teacher, measured in one run: batch-1 and
batch-32 greedy decode tok/s (round-robin, best of --rounds, so the shared CPU's load hits every model alike) and
perplexity on the fixed protocol's held-out pydoc text. For distilled students and structured-pruned checkpoints.

    PYTHONPATH=src .venv/bin/python benchmarks/distilled_decode_speed.py --models pruned=/tmp/pruned,kd=/tmp/kd
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from pernode.jobs.distillation import decode_speeds
from pernode.serve.models.loader import load_model
from pernode.shrink.evaluate.perplexity import evaluate_perplexity
from pernode.shrink.structured.plan import non_embedding_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--models", required=True, help="NAME=PATH,... (checkpoint folders)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=16, help="512-token windows (0: skip perplexity)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"teacher": args.teacher}
    for item in args.models.split(","):
        name, _, path = item.partition("=")
        models[name] = os.path.expanduser(path)
    speeds = decode_speeds(models, steps=args.steps, rounds=args.rounds)
    rows = []
    for name, path in models.items():
        model, source = load_model(path)
        row = {"name": name, "non_embedding_M": round(non_embedding_params(model.config) / 1e6, 2), **speeds[name]}
        if args.eval_windows:
            row["ppl"] = round(evaluate_perplexity(model, source.tokenizer, 512, args.eval_windows).perplexity, 3)
        rows.append(row)
        del model
    base = rows[0]
    print(f"{'model':12s} {'non-emb M':>9s} {'ppl':>8s} {'Δppl':>7s} {'b1 tok/s':>9s} {'×':>5s} {'b32 tok/s':>9s} {'×':>5s}")
    for r in rows:
        dppl = f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}%" if "ppl" in r else "-"
        print(f"{r['name']:12s} {r['non_embedding_M']:9.1f} {r.get('ppl', float('nan')):8.2f} {dppl:>7s} "
              f"{r['b1_tok_s']:9.1f} {r['b1_speedup']:5.2f} {r['b32_tok_s']:9.1f} {r['b32_speedup']:5.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
