"""`pernode bench offline`: one seeded workload, run by pernode and by its peers in the same process, with ratios.

Peers: HF transformers `generate` with static batches (best batch size of a small sweep), and llama.cpp through
llama-cpp-python when installed (`pip install '.[peers]'`), which reads the GGUF directly in its own quantization.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from rich.console import Console
from rich.table import Table

from pernode.progress import output_console
from pernode.measure.bench.config import OfflineBenchConfig
from pernode.measure.bench.offline_throughput import (OfflineWorkload, ThroughputResult, random_workload,
                                                      run_hf_static, run_pernode)
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.models.registry import ModelSource

log = logging.getLogger("pernode.bench")

NUM_SPECIAL_TOKENS = 17  # ids below this are control tokens in the Llama-family vocabularies; prompts avoid them


def hf_model_for(source: ModelSource):
    """HF transformers' LlamaForCausalLM on the same weights pernode serves (fp32)."""
    # lazy: transformers is a heavy optional peer (the `test` extra) that only this comparison needs
    from transformers import AutoModelForCausalLM

    if source.format == "gguf":
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path),
                                                    gguf_file=os.path.basename(source.path),
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()


def run_hf_best(source: ModelSource, workload: OfflineWorkload, batch_sizes: list[int], sweep_prompts: int,
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
        # lazy: llama-cpp-python is an optional peer (`pip install '.[peers]'`), often not installed
        from llama_cpp import Llama
    except ImportError:
        log.info("llama-cpp-python is not installed (pip install '.[peers]'): llama.cpp skipped")
        return None
    llm = Llama(model_path=gguf_path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, logits_all=False)
    start = time.perf_counter()
    for prompt, n in zip(workload.prompts, workload.output_lens):
        llm.reset()
        produced = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            produced += 1
            if produced >= n:
                break
    elapsed = time.perf_counter() - start
    return ThroughputResult("llama.cpp", elapsed, len(workload.prompts), workload.num_output_tokens,
                            workload.num_prompt_tokens, note="one request at a time, its own Q4_1 weights")


def run_bench_offline(llm: LLM, source: ModelSource, config: OfflineBenchConfig) -> list[ThroughputResult]:
    """One seeded workload on `llm` (and on a copy of it per `config.also_dtypes`), then on the peers.
    `source` is the model `llm` serves, which the peers load in their own way."""
    cfg = llm.engine.model_config
    workload = random_workload(config.num_prompts, cfg.vocab_size, config.input_len_range, config.output_len_range,
                               seed=config.seed, avoid_ids=tuple(range(NUM_SPECIAL_TOKENS)))
    results = [run_pernode(llm, workload)]
    for dtype in config.also_dtypes:
        other = LLM.from_engine(LLMEngine(dataclasses.replace(llm.engine.config, dtype=dtype)))
        results.append(run_pernode(other, workload))
        del other
    if "hf" in config.peers and source.quantization_config:
        log.info("HF transformers skipped: %s is a quantized (compressed-tensors) checkpoint", source.path)
    elif "hf" in config.peers:
        pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else cfg.eos_token_ids[0]
        results.append(run_hf_best(source, workload, list(config.hf_batch_sizes), config.hf_sweep_prompts, pad))
    gguf = config.llama_cpp_gguf or (source.path if source.format == "gguf" else None)
    if "llama.cpp" in config.peers and gguf:
        r = run_llama_cpp(gguf, workload, torch.get_num_threads())
        if r:
            results.append(r)
    return results


def print_results(results: list[ThroughputResult], console: Console | None = None) -> None:
    console = console or output_console()
    ours = results[0]
    t = Table(title=f"offline throughput: {ours.num_requests} requests, {ours.prompt_tokens} prompt + "
                    f"{ours.output_tokens} output tokens, all submitted at once")
    for col in ("system", "output tok/s", "req/s", "total tok/s", "elapsed s", "pernode ×", "note"):
        t.add_column(col, justify="right" if col not in ("system", "note") else "left")
    for r in results:
        ratio = ours.output_tokens_per_s / r.output_tokens_per_s
        system = r.system if r.system != "pernode" else f"pernode ({r.note.split(', ')[-1]})"
        t.add_row(system, f"{r.output_tokens_per_s:.1f}", f"{r.requests_per_s:.2f}", f"{r.total_tokens_per_s:.1f}",
                  f"{r.elapsed_s:.1f}", f"{ratio:.2f}", r.note)
    console.print(t)
