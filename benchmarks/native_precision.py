"""Precision configurations of the same GGUF measured in one run: fp32 on dequantized weights (the old default),
bf16 on dequantized weights, and bf16 on the GGUF's own int4/int8 weights (the new default on CPUs with native
bf16), with the machine's matmul peaks measured in the same run.

Per configuration: weight bytes held; prefill tok/s (one 512-token prompt, best of 3); batch-1 TPOT (32-token
prompt, 64 output tokens, best of 3); a mixed offline workload (prompts U[32,512], outputs U[16,256], all at once:
the issue's workload, fewer requests) with its output tok/s and FLOP/s as a share of the measured bf16 / fp32
peak. Usage:

    .venv/bin/python benchmarks/native_precision.py [--num-prompts 16] [--configs float32:float,bfloat16:native]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

from pernode import LLM, SamplingParams
from pernode.measure.bench.offline_throughput import random_workload, run_pernode
from pernode.measure.profile.hardware import measure_matmul_flops
from pernode.measure.profile.roofline import count_params, prefill_cost

CONFIGS = ("float32:float", "bfloat16:float", "bfloat16:native")


def workload_flops(cfg, prompt_lens, output_lens) -> float:
    """Prefill of every prompt plus every decode step (matmuls, LM head, attention over the growing context)."""
    p = count_params(cfg)
    q_dim = cfg.num_attention_heads * cfg.head_dim
    total = 0.0
    for prompt_len, out_len in zip(prompt_lens, output_lens):
        total += prefill_cost(cfg, prompt_len).flops
        for i in range(1, out_len):  # the first output token comes from the prefill's logits
            total += 2.0 * p.linear + 2.0 * cfg.vocab_size * cfg.hidden_size
            total += 4.0 * cfg.num_hidden_layers * q_dim * (prompt_len + i)
    return total


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, shared storage counted once (rotary tables included)."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(model: str, dtype: str, weights: str, num_prompts: int) -> dict:
    llm = LLM(model, dtype=dtype, gguf_weights=weights, max_model_len=1024, num_blocks=1024)
    cfg = llm.engine.model_config
    fresh = iter(range(10))  # a new prompt per repetition: a repeated one would be a prefix-cache hit

    def prefill():
        start = 1000 + 600 * next(fresh)
        llm.generate([list(range(start, start + 512))], SamplingParams(max_tokens=1, ignore_eos=True),
                     use_tqdm=False)

    ids = list(range(1000, 1512))
    prefill_s = best_of(prefill)

    def one_stream():
        outs = llm.generate([ids[:32]], SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert len(outs[0].outputs[0].token_ids) == 64

    first_s = best_of(lambda: llm.generate([ids[:32]], SamplingParams(max_tokens=1, ignore_eos=True),
                                           use_tqdm=False))
    tpot_s = (best_of(one_stream) - first_s) / 63
    out = {"config": f"{dtype}, GGUF weights {weights}", "weight_mb": weight_bytes(llm.engine.model) / 1e6,
           "prefill_tok_s": 512 / prefill_s, "tpot_ms": tpot_s * 1e3, "offline_out_tok_s": float("nan"),
           "offline_gflops": float("nan"), "dtype": dtype}
    if num_prompts:  # 0: prefill and TPOT only
        workload = random_workload(num_prompts, cfg.vocab_size, (32, 512), (16, 256), seed=0,
                                   avoid_ids=tuple(range(17)))
        result = run_pernode(llm, workload, use_tqdm=False)
        flops = workload_flops(cfg, [len(p) for p in workload.prompts], workload.output_lens)
        out.update(offline_out_tok_s=result.output_tokens_per_s, offline_gflops=flops / result.elapsed_s / 1e9)
    del llm
    gc.collect()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-prompts", type=int, default=16, help="mixed offline workload size (0: skip it)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="dtype:gguf_weights pairs")
    args = parser.parse_args(argv)
    print(f"load before: {os.getloadavg()}, threads {torch.get_num_threads()}", flush=True)
    device = torch.device("cpu")
    peaks = {name: measure_matmul_flops(device, key, 1024)[0] / 1e9 for name, key in
             (("float32", "fp32"), ("bfloat16", "bf16"))}
    print(f"measured matmul peaks (1024^3, best of 3): fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} "
          "GFLOP/s", flush=True)
    rows = []
    for pair in args.configs.split(","):
        dtype, weights = pair.split(":")
        rows.append(measure(args.model, dtype, weights, args.num_prompts))
        print(f"  done {pair}: {rows[-1]}", flush=True)
    base = rows[0]
    print(f"\n| config | weights MB | prefill tok/s | batch-1 TPOT ms | offline out tok/s | offline GFLOP/s "
          f"| % of peak ({'/'.join(f'{k} {v:.0f}' for k, v in peaks.items())}) | offline x {base['config']} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = 100 * r["offline_gflops"] / peaks[r["dtype"]]
        print(f"| {r['config']} | {r['weight_mb']:.0f} | {r['prefill_tok_s']:.0f} | {r['tpot_ms']:.1f} | "
              f"{r['offline_out_tok_s']:.1f} | {r['offline_gflops']:.1f} | {share:.0f}% | "
              f"{r['offline_out_tok_s'] / base['offline_out_tok_s']:.2f} |")
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
