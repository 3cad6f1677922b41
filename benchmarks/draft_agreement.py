"""Is a draft's low acceptance real? Teacher-forced top-1 agreement of the draft with the target's own greedy chat
replies, replayed through the engine's rounds, beside the engine's measured greedy acceptance at k = 1..K on the
same replies. Load-independent (counts only). A gap between replay and engine is a bug in the incremental draft
path; equal figures mean the draft itself is the limit.

    nice -n 19 python benchmarks/draft_agreement.py --drafts v1=/work/artifacts/draft --num-prompts 16 \
        --max-tokens 64 --k 1,3 --full-head --sampled-temperature 0.7
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from pernode import LLM, SamplingParams
from pernode.jobs.speculative import chat_prompts
from pernode.serve.engine.spec_decode.teacher_forced import ReplayedAcceptance, agreement, replay_greedy
from pernode.config import DEFAULT_MODEL

ENGINE = dict(kv_cache_bytes=256 * 2**20, max_model_len=2048)


def full_head_copy(path: str, scratch: str) -> str:
    """The draft folder without draft_vocab.json (links to its files): the same draft with its full head."""
    folder = os.path.join(scratch, os.path.basename(path.rstrip("/")) + "-full-head")
    os.makedirs(folder)
    for name in os.listdir(path):
        if name != "draft_vocab.json":
            os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(folder, name))
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--drafts", required=True, help="NAME=PATH,... draft model folders")
    p.add_argument("--k", default="1,2,3", help="proposal lengths, comma-separated")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sampled-temperature", type=float, default=0.0,
                   help="> 0: also the engine's acceptance on sampled requests (seeded) at this temperature")
    p.add_argument("--full-head", action="store_true",
                   help="also each draft that has draft_vocab.json with its full head (the reduced head's check)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    convs = chat_prompts(args.num_prompts)
    target = LLM(args.model, **ENGINE)
    replies = target.chat(convs, params)
    del target
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        drafts = dict(item.split("=", 1) for item in args.drafts.split(","))
        for name, path in list(drafts.items()):
            if args.full_head and os.path.isfile(os.path.join(path, "draft_vocab.json")):
                drafts[name + "/full-head"] = full_head_copy(path, scratch)
        for name, path in drafts.items():
            for k in ks:
                llm = LLM(args.model, speculative=f"draft={path},k={k},adaptive=false", **ENGINE)
                proposer = llm.engine.speculator.proposer
                replay, agree_all, same = ReplayedAcceptance(), [], 0
                for conv, reply in zip(convs, replies):
                    out = llm.chat([conv], params)[0]
                    same += list(out.outputs[0].token_ids) == list(reply.outputs[0].token_ids)
                    # the replay follows the output the engine verified (greedy, so the target's own reply; where
                    # bf16 rounding of a k+1-row verify flips a near-tie it differs from the plain engine's)
                    agree = agreement(proposer, out.prompt_token_ids, out.outputs[0].token_ids)
                    agree_all += agree[1:]
                    replay.add(replay_greedy(agree, k, args.max_tokens))
                s = llm.engine.stats().spec_decode
                row = {"draft": name, "k": k, "teacher_forced_top1": round(sum(agree_all) / len(agree_all), 4),
                       "replayed_acceptance": round(replay.acceptance_rate, 4),
                       "engine_acceptance": round(s.num_accepted_tokens / max(s.num_draft_tokens, 1), 4),
                       "engine_counts": [s.num_draft_tokens, s.num_accepted_tokens],
                       "replayed_counts": [replay.num_draft_tokens, replay.num_accepted_tokens],
                       "greedy_identical": f"{same}/{len(convs)}"}
                if args.sampled_temperature > 0:  # rejection sampling: no replay, the engine's own counts
                    s0 = llm.engine.stats().spec_decode
                    llm.chat(convs, [SamplingParams(temperature=args.sampled_temperature, max_tokens=args.max_tokens,
                                                    ignore_eos=True, seed=i) for i in range(len(convs))])
                    s1 = llm.engine.stats().spec_decode
                    row[f"engine_acceptance_t{args.sampled_temperature}"] = round(
                        (s1.num_accepted_tokens - s0.num_accepted_tokens)
                        / max(s1.num_draft_tokens - s0.num_draft_tokens, 1), 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del llm
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens}, f, indent=1)
    return 0 if all(r["engine_counts"] == r["replayed_counts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
