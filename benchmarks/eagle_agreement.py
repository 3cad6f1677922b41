"""How often does an EAGLE head draft what the served model says? Teacher-forced, chained acceptance on the
chat workload's prompts (the same prompts and reply length as draft_agreement.py, so the figure sits beside a
draft model's teacher-forced top-1): the target's greedy replies, then from every reply position the head drafts
k tokens on its own features (its K/V over the prefix from the true features); draft j counts while drafts 1..j
all equal the target's tokens, over the head's FR-Spec subset when its folder has a draft_vocab.json (as the
engine drafts). Load-independent (counts only).

    nice -n 10 python benchmarks/eagle_agreement.py --head /work/artifacts/b12/eagle_head --num-prompts 16 \
        --max-tokens 64 --k 4
"""
from __future__ import annotations

import argparse
import json

import torch

from pernode import LLM, SamplingParams
from pernode.config import DEFAULT_MODEL
from pernode.jobs.speculative import chat_prompts
from pernode.serve.engine.spec_decode.draft_vocab import read_draft_vocab
from pernode.serve.engine.spec_decode.eagle_head import EagleHead
from pernode.serve.models.loader import load_model
from pernode.shrink.distill.eagle_training import teacher_forced_acceptance


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--head", required=True, help="EAGLE head folder(s), comma-separated NAME=PATH or PATH")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    convs = chat_prompts(args.num_prompts)
    target = LLM(args.model, kv_cache_bytes=256 * 2**20, max_model_len=2048)
    outs = target.chat(convs, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    seqs = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]
    starts = [len(o.prompt_token_ids) for o in outs]
    del target
    model, _ = load_model(args.model)
    rows = {}
    for item in args.head.split(","):
        name, _, path = item.rpartition("=")
        head = EagleHead.load(path)
        with torch.no_grad():
            rows[name or path] = teacher_forced_acceptance(head, model, seqs, starts, args.k,
                                                           read_draft_vocab(path, model.config.vocab_size))
        print(name or path, json.dumps(rows[name or path]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
