"""`pernode bench offline`: one seeded workload, run by pernode and by its peers in the same process, with ratios.

Peers: HF transformers `generate` with static batches (best batch size of a small sweep), and llama.cpp through
llama-cpp-python when installed (`pip install '.[peers]'`), which reads the GGUF directly in its own quantization.
"""
from __future__ import annotations

import logging
import time

import torch

from pernode.measure.bench.offline_throughput import (OfflineWorkload, ThroughputResult, random_workload, run_hf_static,
                                                run_pernode)

log = logging.getLogger("pernode.bench")


def parse_range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a range: use MIN:MAX or N (tokens)") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{name}={text!r} is out of range: need 1 <= MIN <= MAX")
    return lo, hi


def hf_model_for(source):
    """HF transformers' LlamaForCausalLM on the same weights pernode serves (fp32)."""
    import os

    from transformers import AutoModelForCausalLM

    if source.format == "gguf":
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path), gguf_file=os.path.basename(source.path),
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()


def run_hf_best(source, workload: OfflineWorkload, batch_sizes: list[int], sweep_prompts: int,
                pad_token_id: int) -> ThroughputResult:
    model = hf_model_for(source)
    sweep = OfflineWorkload(workload.prompts[:sweep_prompts], workload.output_lens[:sweep_prompts])
    best, best_tps = batch_sizes[0], 0.0
    if len(batch_sizes) > 1:
        for b in batch_sizes:
            r = run_hf_static(model, sweep, b, pad_token_id)
            log.info("HF batch %d on %d requests: %.1f output tok/s", b, len(sweep.prompts), r.output_tokens_per_s)
            if r.output_tokens_per_s > best_tps:
                best, best_tps = b, r.output_tokens_per_s
    return run_hf_static(model, workload, best, pad_token_id)


def run_llama_cpp(gguf_path: str, workload: OfflineWorkload, threads: int) -> ThroughputResult | None:
    """llama.cpp serves requests one at a time here (llama-cpp-python has no continuous batching API)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        log.info("llama-cpp-python is not installed (pip install '.[peers]'): llama.cpp skipped")
        return None
    llm = Llama(model_path=gguf_path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, logits_all=False)
    start = time.perf_counter()
    for prompt, n in zip(workload.prompts, workload.output_lens):
        llm.reset()
        produced = 0
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            produced += 1
            if produced >= n:
                break
    elapsed = time.perf_counter() - start
    return ThroughputResult("llama.cpp", elapsed, len(workload.prompts), workload.num_output_tokens,
                            workload.num_prompt_tokens, note="one request at a time, its own Q4_1 weights")


def run_bench_offline(llm, source, args) -> list[ThroughputResult]:
    cfg = llm.engine.model_config
    special = tuple(range(17))
    workload = random_workload(args.num_prompts, cfg.vocab_size, parse_range(args.input_len, "input_len"),
                               parse_range(args.output_len, "output_len"), seed=args.seed, avoid_ids=special)
    results = [run_pernode(llm, workload)]
    for dtype in filter(None, (d.strip() for d in args.also_dtypes.split(","))):
        import dataclasses

        from pernode.serve.engine.llm_engine import LLMEngine
        from pernode.serve.llm import LLM

        other = LLM.from_engine(LLMEngine(dataclasses.replace(llm.engine.config, dtype=dtype)))
        results.append(run_pernode(other, workload))
        del other
    peers = {p.strip() for p in args.peers.split(",")} - {"none", ""}
    unknown = peers - {"hf", "llama.cpp"}
    if unknown:
        raise ValueError(f"peers={sorted(unknown)} unknown: allowed hf, llama.cpp, none")
    if "hf" in peers and source.quantization_config:
        log.info("HF transformers skipped: %s is a quantized (compressed-tensors) checkpoint", source.path)
    elif "hf" in peers:
        sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
        pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else cfg.eos_token_ids[0]
        results.append(run_hf_best(source, workload, sizes, args.hf_sweep_prompts, pad))
    gguf = args.llama_cpp_gguf or (source.path if source.format == "gguf" else None)
    if "llama.cpp" in peers and gguf:
        r = run_llama_cpp(gguf, workload, torch.get_num_threads())
        if r:
            results.append(r)
    return results


def print_results(results: list[ThroughputResult], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ours = results[0]
    t = Table(title=f"offline throughput: {ours.num_requests} requests, {ours.prompt_tokens} prompt + "
                    f"{ours.output_tokens} output tokens, all submitted at once")
    for col in ("system", "output tok/s", "req/s", "total tok/s", "elapsed s", "pernode ×", "note"):
        t.add_column(col, justify="right" if col not in ("system", "note") else "left")
    for r in results:
        ratio = ours.output_tokens_per_s / r.output_tokens_per_s
        t.add_row(r.system if r.system != "pernode" else f"pernode ({r.note.split(', ')[-1]})", f"{r.output_tokens_per_s:.1f}", f"{r.requests_per_s:.2f}", f"{r.total_tokens_per_s:.1f}",
                  f"{r.elapsed_s:.1f}", f"{ratio:.2f}", r.note)
    console.print(t)
