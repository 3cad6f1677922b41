"""What the quantized lm_head's x precision costs: the default model's Q8_0 lm_head on held-out pydoc text, its
logits from the GEMV with float x (int16 per 32 values on AVX2, fp32 elsewhere) and with int8 x, against fp32 logits
of the dequantized weight; then the README chat question's first token, a near-tie, both ways; then each GEMV's
time at one row.

    python benchmarks/lm_head_precision.py [--windows 8] [--seq-len 512]

Rows go through the lm_head 8 at a time, as decode-sized calls do.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pernode import LLM, SamplingParams
from pernode.config import DEFAULT_MODEL
from pernode.shrink.evaluate.perplexity import corpus_text, final_hidden_states, split_corpus, token_windows

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def seconds_per_call(fn, rounds: int = 6, min_s: float = 0.1) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < min_s:
            fn()
            calls += 1
        best = min(best, (time.perf_counter() - started) / calls)
    return best


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    llm = LLM(args.model, max_model_len=1024)
    model, head = llm.engine.model, llm.engine.model.lm_head
    if not hasattr(head, "_run_int8_gemv"):
        raise SystemExit("this model's lm_head is not quantized")
    fp32_weight = head.dequantized_weight().float()
    paths = {"float x": lambda h: head._op(h, *head._float_op_args, False),
             "int8 x": lambda h: head._op(h, *head._op_args, True)}
    _, held_out = split_corpus(corpus_text())
    windows = token_windows(llm.tokenizer.encode(held_out), args.seq_len, args.windows)
    nll = {name: 0.0 for name in ["fp32", *paths]}
    agree = {name: 0 for name in paths}
    worst = {name: 0.0 for name in paths}
    count = 0
    for window in windows:
        hidden, targets = final_hidden_states(model, window[None]), window[1:]
        for i in range(0, targets.numel(), 8):
            h, t = hidden[i:i + 8][: targets.numel() - i], targets[i:i + 8]
            ref = h.float() @ fp32_weight.T
            nll["fp32"] += F.cross_entropy(ref, t, reduction="sum").item()
            for name, run in paths.items():
                logits = run(h).float()
                nll[name] += F.cross_entropy(logits, t, reduction="sum").item()
                agree[name] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                worst[name] = max(worst[name], (logits - ref).abs().max().item())
            count += len(t)
    print(f"{count} held-out tokens, rows 8 at a time; perplexity (fp32 logits) "
          f"{torch.tensor(nll['fp32'] / count).exp().item():.4f}")
    x1 = torch.randn(1, head.in_features)
    for name, run in paths.items():
        ppl = torch.tensor(nll[name] / count).exp().item()
        print(f"  {name}: perplexity {ppl:.4f}, top-1 agreement with fp32 {agree[name] / count:.4f}, "
              f"max |logit - fp32| {worst[name]:.4f}, {seconds_per_call(lambda: run(x1)) * 1e3:.2f} ms a row "
              f"({torch.get_num_threads()} threads)")
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    for name, cap in (("float x", 0), ("int8 x", 8)):
        saved, head._int8_max_rows = head._int8_max_rows, cap
        out = llm.chat(CHAT, params)[0].outputs[0]
        head._int8_max_rows = saved
        top = ", ".join(f"{tok!r} {lp:.3f}" for _, tok, lp in out.logprobs[0].top)
        print(f"  chat question, {name}: {llm.tokenizer.decode(out.token_ids)!r} (first token: {top})")


if __name__ == "__main__":
    main()
