"""Quantization methods on the default model, measured in one run: checkpoint MB, perplexity (one forward per
window, and fed 8 tokens per forward as decode runs), batch-1 decode tok/s (with the achieved weight bandwidth),
batch-64 decode throughput, each next to fp32.

Every method writes its checkpoint, and the numbers come from the model re-loaded from that checkpoint the way
the engine loads it. "fp32" is the default GGUF (Q4_1) dequantized to fp32: the starting point of every method.

    PYTHONPATH=src .venv/bin/python benchmarks/quantization.py --quick       # a few minutes
    PYTHONPATH=src .venv/bin/python benchmarks/quantization.py --methods rtn-int8,gptq-int4-g64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from pernode.jobs.compare_quantized import build_and_score, measure_speeds
from pernode.quant_format import W8A8_SCHEME, QuantScheme, quantize_weight
from pernode.serve.kernels.quant_linear import QuantLinear
from pernode.serve.kernels.w8a8_linear import W8A8Linear
from pernode.serve.models.registry import resolve_model
from pernode.shrink.recipes import RECIPES, recipes_named


def linear_throughput(batches=(64, 256), shapes=((576, 3072), (1536, 576)), repeats: int = 20) -> list[dict]:
    """One projection in isolation: fp32 F.linear vs W8A8 (dynamic per-token int8 x int8 via torch._int_mm,
    quantization of x included) vs int8/int4 weight-only, in GFLOP/s."""
    def timed(fn):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    rows = []
    for k, n in shapes:
        w = torch.randn(n, k)
        w8a8 = W8A8Linear(k, n, W8A8_SCHEME)
        w8a8.set_quantized(*quantize_weight(w, QuantScheme(8))[:2])
        woq8 = QuantLinear(k, n, QuantScheme(8))
        woq8.set_quantized(*quantize_weight(w, QuantScheme(8)))
        for m in batches:
            x = torch.randn(m, k)
            flops = 2 * m * k * n
            t_fp = timed(lambda: torch.nn.functional.linear(x, w))
            t_q = timed(lambda: w8a8(x))
            t_w = timed(lambda: woq8(x))
            rows.append({"k": k, "n": n, "m": m, "fp32_gflops": flops / t_fp / 1e9, "w8a8_gflops": flops / t_q / 1e9,
                         "woq_int8_gflops": flops / t_w / 1e9, "w8a8_speedup": t_fp / t_q})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="4 windows of 512 tokens, short decode runs")
    ap.add_argument("--methods", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and kernel threads (default 1: robust on a CPU shared with other jobs)")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp's batch-1 decode of the same GGUF")
    ap.add_argument("--linear-only", action="store_true", help="only the single-projection W8A8 throughput table")
    ap.add_argument("--out", default=None, help="folder for checkpoints and results.json (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["PERNODE_QUANT_THREADS"] = str(args.threads)
    seq_len, windows = (512, 4) if args.quick else (2048, 8)
    steps1, steps64 = (16, 2) if args.quick else (64, 4)
    out = args.out or tempfile.mkdtemp(prefix="pernode-quant-")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    try:
        recipes = recipes_named(names)
    except ValueError as exc:
        raise SystemExit(f"--methods: {exc}")

    rows, peer = [], None
    if not args.linear_only:
        rows = build_and_score(args.model, recipes, out, seq_len, windows, args.calib_windows,
                               progress=lambda row: print(json.dumps(row), flush=True))
        peer_gguf = None
        if not args.no_peer:
            src = resolve_model(args.model)
            peer_gguf = src.path if src.format == "gguf" else None
        peer = measure_speeds(rows, steps1, steps64, peer_gguf=peer_gguf, threads=args.threads)
    lin = linear_throughput()
    print("\nsingle projection, batch m: GFLOP/s (W8A8 includes quantizing x per token)")
    print("| K x N | m | fp32 | W8A8 int8 GEMM | x fp32 | int8 weight-only |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in lin:
        print(f"| {r['k']}x{r['n']} | {r['m']} | {r['fp32_gflops']:.0f} | {r['w8a8_gflops']:.0f} | "
              f"{r['w8a8_speedup']:.2f} | {r['woq_int8_gflops']:.0f} |")
    if not rows:
        return 0
    base = next((r for r in rows if r["name"] == "fp32"), rows[0])
    print(f"\nmodel {args.model}; ppl on {base['ppl_tokens']} predictions ({windows} windows x {seq_len}); "
          f"{args.threads} thread(s)")
    print("| config | weights | ckpt MB | ppl | d ppl | ppl, decode path | b1 tok/s | x fp32 | b1 GB/s (weights) "
          "| b64 tok/s | x fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['scheme']} | {r['checkpoint_mb']:.0f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['ppl_decode_path']:.3f} | {r['decode_b1_tok_s']:.1f} | "
              f"{r['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f} | {r['decode_b1_gbs']:.1f} "
              f"({r['weight_mb_per_token']:.0f} MB) | {r['decode_b64_tok_s']:.0f} | "
              f"{r['decode_b64_tok_s'] / base['decode_b64_tok_s']:.2f} |")
    if peer:
        print(f"| llama.cpp (peer) | its GGUF as shipped | {peer['gguf_mb']:.0f} | | | | "
              f"{peer['decode_b1_tok_s']:.1f} | {peer['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f} | | | |")
        rows.append(peer)
    else:
        print("llama.cpp peer: not measured (llama-cpp-python missing, --no-peer, or not a GGUF model)")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\ncheckpoints and results.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
