"""The C++ paged-attention kernel reading an fp32 KV cache vs the same cache quantized to int8 (per-token scales).

Decode reads every cached K/V byte once per step, so the int8 cache (head_dim + 4 bytes per head per token instead of
4 x head_dim) should be faster where the read dominates; prefill is compute-bound and pays the widening. Both caches
are timed in the same run, interleaved, best of N. Prints, never asserts.

    PYTHONPATH=src python benchmarks/kv_cache_int8.py [--shape llama] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attention_kernels import SHAPES, make_batch, read_bandwidth_gbs, time_call  # noqa: E402

from pernode.serve.kernels.kv_quant import QuantizedKV, quantize_rows  # noqa: E402
from pernode.serve.kernels.paged_attention_cpu import load_kernel, paged_attention_cpu  # noqa: E402


def quantized(cache: torch.Tensor) -> QuantizedKV:
    return QuantizedKV(*quantize_rows(cache, torch.int8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="smollm")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_kernel() is None:
        print("C++ kernel did not build; nothing to compare")
        return
    hq, hkv, d = SHAPES[args.shape]
    budget = 0.3 if args.quick else 1.0
    print(f"shape {args.shape}: Hq={hq} Hkv={hkv} D={d}, block_size={args.block_size}, "
          f"threads={torch.get_num_threads()}, memory read ~{read_bandwidth_gbs():.1f} GB/s")
    batches = [1, 32] if args.quick else [1, 32, 128]
    cases = [("decode", [(ctx, 1)] * b) for ctx in (512, 2048) for b in batches] + [("prefill", [(512, 512)])]
    print(f"{'case':<26}{'fp32 ms':>10}{'GB/s':>7}{'int8 ms':>10}{'GB/s':>7}{'int8 speed-up':>15}{'max |diff|':>12}")
    for kind, seqs in cases:
        query, k, v, meta, scale = make_batch(seqs, hq, hkv, d, args.block_size, torch.float32)
        kq, vq = quantized(k), quantized(v)
        tokens = sum(L for L, _ in seqs)
        bytes_fp32, bytes_int8 = tokens * hkv * d * 2 * 4, tokens * hkv * (d + 4) * 2
        t32 = t8 = float("inf")
        for _ in range(3):  # interleaved, so both see the same neighbours' load
            t32 = min(t32, time_call(lambda: paged_attention_cpu(query, k, v, meta, scale), budget / 3))
            t8 = min(t8, time_call(lambda: paged_attention_cpu(query, kq, vq, meta, scale), budget / 3))
        diff = (paged_attention_cpu(query, k, v, meta, scale) - paged_attention_cpu(query, kq, vq, meta, scale))
        label = f"{kind} b={len(seqs)} ctx={seqs[0][0]}" + (f" q={seqs[0][1]}" if kind == "prefill" else "")
        print(f"{label:<26}{t32 * 1e3:>10.3f}{bytes_fp32 / t32 / 1e9:>7.1f}{t8 * 1e3:>10.3f}"
              f"{bytes_int8 / t8 / 1e9:>7.1f}{t32 / t8:>14.2f}x{diff.abs().max().item():>12.4f}", flush=True)


if __name__ == "__main__":
    main()
