"""Flags shared by several commands, and the one place that maps them to library settings."""
from __future__ import annotations

import argparse
import re

from pernode.config import DEFAULT_MODEL, GGUF_WEIGHTS, KV_CACHE_DTYPES, EngineConfig
from pernode.serve.sampling.params import SamplingParams

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
          "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9'-free integers: sizes as people write them."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 2GiB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def int_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None


def add_model_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str | None = None) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=help_text or "known name, a .gguf file or a Hugging Face folder")


def add_gguf_weights_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--gguf-weights", default=None, choices=list(GGUF_WEIGHTS),
                   help="a GGUF's Q4_0/Q4_1/Q8_0/Q4_K weights: native (served at their own precision, the default on "
                        "CPU) or float (dequantized to --dtype)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    add_model_argument(g)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 where the CPU computes it natively, AVX512_BF16 or AMX; "
                        "else float32; bfloat16 on CUDA)")
    add_gguf_weights_argument(g)
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks (wins over --kv-cache-bytes)")
    g.add_argument("--kv-cache-bytes", type=parse_bytes, default=None, help="KV cache size, e.g. 2GiB")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output, in tokens")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--prefix-cache-salt", default=None,
                   help="mixed into every prefix-cache key: servers (tenants) with different salts never share "
                        "cached prefixes (default: none)")
    g.add_argument("--threads", "--num-threads", dest="num_threads", type=int, default=None,
                   help="CPU threads for torch (default: the usable CPUs, or 1 when a start-up probe finds the "
                        "CPUs too busy for a team; see docs/threads.md)")
    g.add_argument("--compile", action="store_true",
                   help="run the forward through torch.compile (compiles at start; cached between runs)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (float16 under float32 compute, else the compute dtype), "
                        "float32 / float16 / bfloat16 (whatever the compute dtype), int8 (per-token scales; ~3.8x "
                        "the tokens of fp32), fp8 e4m3 (CUDA only)")
    g.add_argument("--speculative", default=None, metavar="SPEC",
                   help="speculative decoding: 'ngram,k=4' (prompt lookup; ngram_min=N, ngram_max=N) or "
                        "'draft=PATH,k=4' (a smaller model with the same tokenizer); add adaptive=false for a fixed k")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                        num_blocks=args.num_blocks, kv_cache_bytes=args.kv_cache_bytes,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=not args.no_prefix_caching, num_threads=args.num_threads,
                        prefix_cache_salt=args.prefix_cache_salt, gguf_weights=args.gguf_weights,
                        kv_cache_dtype=args.kv_cache_dtype, compile=args.compile,
                        speculative=getattr(args, "speculative", None))


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[])


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                          repetition_penalty=args.repetition_penalty, stop=args.stop)
