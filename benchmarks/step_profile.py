"""Where a mixed offline workload's step time goes, by kind of work, from torch.profiler (1 thread: shares of one
thread's time do not depend on how busy the other cores are).

    PYTHONPATH=src python benchmarks/step_profile.py --num-prompts 16 --threads 1

The workload is `pernode bench offline`'s kind (all requests at once, prompts and outputs of uniformly random
length), smaller. Each op's self time is put in one bucket by its name; "Python and framework" is the wall time no
op accounts for (the engine's scheduling, the model's Python per layer, dispatch). woq_gemm dequantizes weight tiles
inside the op, so its dequantization share is measured apart: the same GEMM timed on a pre-dequantized weight.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from pernode import LLM, SamplingParams
from pernode.serve.kernels.quant_linear import QuantLinear

BUCKETS = [  # (bucket, substrings of op names), first match wins
    # woq_gemm calls aten::mm once per dequantized weight tile: its own (self) time is the tile dequantization
    ("woq_gemm tile dequantization (its self time)", ("woq_gemm",)),
    ("GEMV, quantized weights (woq_linear)", ("woq_linear",)),
    ("oneDNN GEMM (aten::mm: woq_gemm's tiles; float layers)", ("aten::mm", "aten::addmm", "aten::linear",
                                                               "aten::matmul", "dense_gemv", "aten::bmm")),
    ("attention", ("paged_attention", "scaled_dot_product", "_softmax", "attention")),
    ("norms", ("rms_norm",)),
    ("rotary + SwiGLU", ("rotary", "silu_and_mul")),
    ("KV writes", ("index_copy", "index_put", "kv_quant", "write_quantized")),
    ("sampling", ("argmax", "topk", "multinomial", "sort", "softmax", "log_softmax", "cumsum")),
    ("embedding, gathers, copies, casts", ("embedding", "index_select", "aten::index", "copy_", "aten::to",
                                          "_to_copy", "aten::cat", "contiguous", "clone")),
]


def bucket_of(name: str) -> str:
    return next((b for b, keys in BUCKETS if any(k in name for k in keys)), "other ops")


def workload(tokenizer, count: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0):
    import pydoc_data.topics
    ids = tokenizer.encode("\n".join(pydoc_data.topics.topics.values()))
    rng = np.random.default_rng(seed)
    prompts, outs = [], []
    for _ in range(count):
        n = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        start = int(rng.integers(0, len(ids) - n))
        prompts.append(ids[start:start + n])
        outs.append(int(rng.integers(output_len[0], output_len[1] + 1)))
    return prompts, outs


def dequant_share_of_woq_gemm(model: torch.nn.Module, rows: int, dtype: torch.dtype) -> float:
    """Share of a woq_gemm call at `rows` rows spent beyond the same GEMM on an already dequantized weight,
    summed over the decoder's layers (median of 5, interleaved)."""
    extra, total = 0.0, 0.0
    for layer in {(m.out_features, m.in_features): m for m in model.modules()
                  if isinstance(m, QuantLinear) and m is not getattr(model, "lm_head", None)}.values():
        x = torch.randn(rows, layer.in_features).to(dtype)
        w = layer.dequantized_weight().to(dtype)
        woq, plain = [], []
        for _ in range(5):
            t = time.perf_counter(); layer._run_gemm(x); woq.append(time.perf_counter() - t)
            t = time.perf_counter(); torch.nn.functional.linear(x, w); plain.append(time.perf_counter() - t)
        extra += max(0.0, statistics.median(woq) - statistics.median(plain))
        total += statistics.median(woq)
    return extra / total if total else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", default="32,512")
    ap.add_argument("--output-len", default="16,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=12, help="also list this many ops by self time")
    args = ap.parse_args()
    print(f"load before: {os.getloadavg()}")
    llm = LLM(args.model, num_threads=args.threads)
    lo, hi = map(int, args.prompt_len.split(","))
    olo, ohi = map(int, args.output_len.split(","))
    prompts, outs = workload(llm.tokenizer, args.num_prompts, (lo, hi), (olo, ohi))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs]
    llm.generate(prompts[:2], params[:2])  # warm: oneDNN primitives, first-touch
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        llm.generate(prompts, params)
        wall_s = time.perf_counter() - started
    shares: dict[str, float] = defaultdict(float)
    ops = []
    for evt in prof.key_averages():
        self_s = evt.self_cpu_time_total / 1e6
        if evt.key.startswith("ProfilerStep") or self_s <= 0:
            continue
        shares[bucket_of(evt.key)] += self_s
        ops.append((self_s, evt.key, evt.count))
    shares["Python and framework (wall minus ops)"] = max(0.0, wall_s - sum(shares.values()))
    print(f"\n{len(prompts)} requests, {sum(len(p) for p in prompts)} prompt + {sum(outs)} output tokens, "
          f"{args.threads} thread(s), wall {wall_s:.1f} s (profiled)")
    for name, s in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * s / wall_s:5.1f}%  {s:7.2f} s  {name}")
    print("\ntop ops by self time:")
    for s, key, count in sorted(ops, reverse=True)[:args.top]:
        print(f"  {100 * s / wall_s:5.1f}%  {key} x{count}")
    model = llm.engine.model
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    share = dequant_share_of_woq_gemm(model, 256, dtype)
    print(f"\nwoq_gemm at 256 rows: {100 * share:.0f}% of its time beyond a GEMM on pre-dequantized {dtype} weights")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
