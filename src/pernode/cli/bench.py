"""`pernode bench serve` (a load generator for any OpenAI-compatible server) and `pernode bench offline` (pernode
beside its peers on one seeded workload)."""
from __future__ import annotations

import argparse
import dataclasses
import math

from pernode.cli.options import add_engine_arguments, engine_config_from_args
from pernode.measure.bench.bench_offline import print_results, run_bench_offline
from pernode.measure.bench.bench_serve import print_bench_table, run_bench
from pernode.measure.bench.config import BenchConfig, OfflineBenchConfig
from pernode.measure.bench.datasets import DATASETS
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.models.registry import resolve_model


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: serve (any OpenAI server), offline (pernode vs peers)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    p = bench_sub.add_parser("offline", help="one seeded workload on pernode and its peers, with ratios")
    add_offline_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=run_offline)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `pernode bench serve` (names follow vLLM's benchmark_serving where one exists)."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, with or without /v1 (default %(default)s)")
    g.add_argument("--model", default=None, help="model name to send; default: the first of GET /v1/models")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' when given")
    g.add_argument("--request-timeout-s", type=float, default=600.0,
                   help="longest wait for the next byte of a response (default %(default)s)")
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random lengths, a JSONL file of prompts, or the built-in chat mix (default %(default)s)")
    g.add_argument("--dataset-path", default=None,
                   help='JSONL with {"prompt": ..., "max_tokens": ...} or {"messages": [...], "max_tokens": ...}')
    g.add_argument("--random-input-len", default="512", help="prompt tokens, N or MIN:MAX (default %(default)s)")
    g.add_argument("--random-output-len", default="128", help="output tokens, N or MIN:MAX (default %(default)s)")
    g.add_argument("--jsonl-max-tokens", type=int, default=256,
                   help="max_tokens for JSONL lines that give none (default %(default)s)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, its folder, or a .gguf, for exact prompt token counts; optional")
    g.add_argument("--num-prompts", type=int, default=100, help="requests to send (default %(default)s)")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests/s; inf sends all at once (default %(default)s)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, <1 burstier (default %(default)s)")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts and arrivals (default %(default)s)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos=true so outputs run to max_tokens (vLLM and llama.cpp honour it)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default %(default)s)")
    g.add_argument("--num-warmup", type=int, default=1,
                   help="short requests sent (not counted) before the run; also checks the server (default 1)")
    g = parser.add_argument_group("report")
    g.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=10000")
    g.add_argument("--percentiles", default="50,90,99", help="latency percentiles (default %(default)s)")
    g.add_argument("--out", default=None, help="write the result JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_offline_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = OfflineBenchConfig()
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--input-len", default=d.input_len, help="prompt length range MIN:MAX or N (tokens)")
    p.add_argument("--output-len", default=d.output_len, help="output length range MIN:MAX or N (tokens)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--peers", default=",".join(d.peers), help="comma list of hf, llama.cpp, or 'none'")
    p.add_argument("--hf-batch-sizes", default=",".join(map(str, d.hf_batch_sizes)),
                   help="static batch sizes HF is swept over")
    p.add_argument("--hf-sweep-prompts", type=int, default=d.hf_sweep_prompts,
                   help="requests used to pick HF's best batch")
    p.add_argument("--also-dtypes", default="", help="also run pernode in these dtypes, e.g. bfloat16")
    p.add_argument("--llama-cpp-gguf", default=None, metavar="PATH",
                   help="the GGUF llama.cpp runs (default: --model when it is a GGUF), e.g. to set the packaged "
                        "Q4_1 beside a `pernode quantize` int4 checkpoint")
    return p


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})


def offline_config_from_args(args: argparse.Namespace) -> OfflineBenchConfig:
    try:
        batch_sizes = tuple(int(b) for b in _comma_list(args.hf_batch_sizes))
    except ValueError:
        raise ValueError(f"--hf-batch-sizes {args.hf_batch_sizes!r}: expected comma-separated integers, "
                         f"e.g. 8,16,32") from None
    return OfflineBenchConfig(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                              seed=args.seed, peers=tuple(p for p in _comma_list(args.peers) if p != "none"),
                              hf_batch_sizes=batch_sizes, hf_sweep_prompts=args.hf_sweep_prompts,
                              also_dtypes=_comma_list(args.also_dtypes), llama_cpp_gguf=args.llama_cpp_gguf)


def run_serve(args: argparse.Namespace) -> int:
    result = run_bench(bench_config_from_args(args))
    print_bench_table(result)
    return 0 if not result.metrics.failed_requests else 1


def run_offline(args: argparse.Namespace) -> int:
    config = offline_config_from_args(args)  # before the engine loads: a bad flag fails at once
    engine = LLMEngine(engine_config_from_args(args))
    results = run_bench_offline(LLM.from_engine(engine), resolve_model(args.model), config)
    print_results(results)
    return 0
