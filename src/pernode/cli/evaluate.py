"""`pernode eval ppl`: perplexity on real held-out text, through the model as the engine builds it."""
from __future__ import annotations

import argparse
import sys

import torch

from pernode.cli.options import add_gguf_weights_argument, add_model_argument
from pernode.config import KV_CACHE_DTYPES
from pernode.serve.engine.llm_engine import resolve_dtype
from pernode.serve.kernels.kv_quant import resolve_kv_cache_dtype
from pernode.serve.models.loader import load_model
from pernode.shrink.evaluate.perplexity import DEFAULT_SEQ_LEN, QUICK_SEQ_LEN, evaluate_perplexity


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="quality evaluations")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("ppl", help="perplexity on real text (pydoc topics, evaluation split)")
    add_model_argument(p, "known name, a .gguf file or an HF (quantized) folder")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default 2048, 512 with --quick)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (--quick: 8)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--corpus", default=None, help="UTF-8 text file instead of the pydoc topics")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="feed each window N tokens per forward with its KV cache carried, as decode runs (the "
                        "int4 decode kernel quantizes x; default: one forward per window)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="score through the KV cache as served: auto (the engine's: float16 under float32 "
                        "compute, else the compute dtype), float32, float16, bfloat16, int8 (per-token scales), "
                        "fp8 (CUDA)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: the engine's, bfloat16 where the CPU computes it natively)")
    add_gguf_weights_argument(p)
    p.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    seq_len = args.seq_len or (QUICK_SEQ_LEN if args.quick else DEFAULT_SEQ_LEN)
    max_windows = args.max_windows if args.max_windows is not None else (8 if args.quick else None)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    gguf_weights = args.gguf_weights or "native"  # as the engine serves it on CPU
    model, source = load_model(args.model, dtype=dtype, max_positions=seq_len, gguf_weights=gguf_weights)
    result = evaluate_perplexity(
        model, source.tokenizer, seq_len=seq_len, max_windows=max_windows, corpus=args.corpus,
        step_tokens=args.step_tokens, kv_cache_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, dtype),
        progress=lambda i, n, ppl: print(f"  window {i}/{n}: running ppl {ppl:.4f}", file=sys.stderr))
    weights = f", GGUF weights {gguf_weights}" if source.format == "gguf" else ""
    print(f"{source.config.name} in {str(dtype).removeprefix('torch.')}{weights}:")
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f} nats) over {result.num_tokens} "
          f"predictions in {result.num_windows} windows of {result.seq_len} tokens; {result.tokens_per_s:.0f} tok/s")
    return 0
