"""Speculation at concurrency: throughput of the mixed workload (chat + input-grounded requests, all at once) with
each proposer (adaptive k, the engine's default) against the same engine without speculation, rounds interleaved
(off, proposer A, proposer B, off, ...) so that a change of the machine's load hits every engine alike. The issue's
target: speculation on is never more than 3% slower than off. Beside wall-clock throughput it prints throughput per
CPU-second of this process: on a shared machine other jobs stretch the wall clock of whichever engine they happen to
overlap, much less the CPU time it spends (with OMP_NUM_THREADS=1 the engine computes on one thread).

    nice -n 19 python benchmarks/spec_concurrency.py --draft /work/artifacts/draft_v2 --concurrency 32 \
        --max-tokens 32 --rounds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from pernode.config import DEFAULT_MODEL, EngineConfig, SpeculativeConfig
from pernode.jobs.speculative import chat_prompts, grounded_prompts
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=None, help="draft folder (adds the draft proposer)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = EngineConfig(model=args.model, max_model_len=2048, kv_cache_bytes=512 * 2**20)
    specs = {"off": None, "ngram": SpeculativeConfig("ngram", k=args.k)}
    if args.draft:
        specs["draft"] = SpeculativeConfig("draft", k=args.k, draft_model=args.draft)
    llms = {n: LLM.from_engine(LLMEngine(dataclasses.replace(config, speculative=s))) for n, s in specs.items()}
    half = args.concurrency // 2
    convs = [c for pair in zip(chat_prompts(half), grounded_prompts(half)) for c in pair]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for llm in llms.values():  # warm-up: kernels and the adaptive rule's step costs
        llm.chat(convs, params)
    seconds = {n: 0.0 for n in llms}
    cpu_seconds = {n: 0.0 for n in llms}
    tokens = {n: 0 for n in llms}
    outputs = {n: None for n in llms}
    print(f"load average before: {load_average()}", flush=True)
    for r in range(args.rounds):
        names = list(llms)
        for name in names[r % len(names):] + names[:r % len(names)]:
            started, cpu_started = time.perf_counter(), time.process_time()
            outs = llms[name].chat(convs, params)
            seconds[name] += time.perf_counter() - started
            cpu_seconds[name] += time.process_time() - cpu_started
            tokens[name] += sum(len(o.outputs[0].token_ids) for o in outs)
            outputs[name] = [list(o.outputs[0].token_ids) for o in outs]
    load_after = load_average()
    print(f"load average after: {load_after}", flush=True)
    base = tokens["off"] / seconds["off"]
    cpu_base = tokens["off"] / cpu_seconds["off"]
    rows = []
    for name, llm in llms.items():
        s = llm.engine.stats().spec_decode
        rate = tokens[name] / seconds[name]
        cpu_rate = tokens[name] / cpu_seconds[name]
        rows.append({"proposer": name, "tok_per_s": round(rate, 2), "throughput_ratio": round(rate / base, 3),
                     "tok_per_cpu_s": round(cpu_rate, 2), "cpu_throughput_ratio": round(cpu_rate / cpu_base, 3),
                     "steps_declined": None if s is None else s.num_steps_declined,
                     "steps_speculating": None if s is None else s.num_steps_speculating,
                     "proposed": None if s is None else s.num_draft_tokens,
                     "accepted": None if s is None else s.num_accepted_tokens,
                     "identical_to_off": sum(a == b for a, b in zip(outputs[name], outputs["off"]))})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                       "rounds": args.rounds, "load_after": load_after}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
