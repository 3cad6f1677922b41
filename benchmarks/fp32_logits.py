"""fp32 logits for the sampled rows (serve/models/fp32_logits.py) against bf16 logits: greedy tokens on the README
prompts and the chat question against fp32 on dequantized weights, and the batch-1 TPOT of the two paths,
interleaved round by round in one process (the same model; only the logits path is swapped).

    python benchmarks/fp32_logits.py --threads 1 --rounds 5 --max-tokens 48
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pernode import LLM, SamplingParams
from pernode.serve.models import llama

README_PROMPTS = ["The capital of France is", "def fib(n):", "Hi!"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def bf16_logits(norm, lm_head, hidden):
    """The path before fp32 logits: norm and lm_head in the decoder's dtype, the logits rounded to it."""
    return lm_head(norm(hidden)).float()


def greedy(llm: LLM, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate(README_PROMPTS, params) + llm.chat(CHAT, params)
    return [list(o.outputs[0].token_ids) for o in outs]


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "same" if i is None and len(a) == len(b) else f"differs at token {i}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()}")
    engine = dict(max_model_len=512, num_blocks=64, num_threads=args.threads)
    reference = LLM(args.model, dtype="float32", gguf_weights="float", **engine)
    ref_tokens = greedy(reference, args.max_tokens)
    tok = reference.tokenizer
    del reference
    llm = LLM(args.model, **engine)  # the default: bf16 where the CPU has it, GGUF-native weights
    paths = {"bf16 logits (before)": bf16_logits, "fp32 logits (now)": llama.sampled_logits}
    fp32_path = llama.sampled_logits
    for name, fn in paths.items():
        llama.sampled_logits = fn
        tokens = greedy(llm, args.max_tokens)
        print(f"\n{name}: greedy tokens against fp32 + dequantized weights")
        for prompt, ref, ours in zip(README_PROMPTS + ["chat: " + CHAT[0]["content"]], ref_tokens, tokens):
            print(f"  {prompt!r:40} {first_difference(ref, ours):22} {tok.decode(ours[:12])!r}")
    # batch-1 TPOT: a short prompt, max_tokens decode steps; the two paths alternate round by round
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    # wall time, and the process's CPU time: on a busy machine the second does not count the time others hold the CPU
    tpot: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            llama.sampled_logits = fn
            started, started_cpu = time.perf_counter(), time.process_time()
            llm.generate(["The capital of France is"], params)
            tpot[name].append((time.perf_counter() - started) / args.max_tokens)
            cpu[name].append((time.process_time() - started_cpu) / args.max_tokens)
    llama.sampled_logits = fp32_path
    base = statistics.median(tpot["bf16 logits (before)"])
    base_cpu = statistics.median(cpu["bf16 logits (before)"])
    print(f"\nbatch-1 time per output token (median of {args.rounds} interleaved rounds, {args.threads} thread(s)):")
    for name in paths:
        wall, used = statistics.median(tpot[name]), statistics.median(cpu[name])
        print(f"  {name:22} wall {wall * 1e3:7.2f} ms ({wall / base:.3f}x)   CPU {used * 1e3:7.2f} ms "
              f"({used / base_cpu:.3f}x)")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
