"""Decode speed of a checkpoint as the engine serves it (its runner and sampler over a paged KV cache, without the
scheduler's bookkeeping), and llama.cpp's on a GGUF for comparison.

Batch-1 decode streams every weight once per token, so tok/s x weight bytes is the achieved bandwidth.
"""
from __future__ import annotations

import time

from torch import nn

from pernode.config import DEFAULT_BLOCK_SIZE, EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine


def decode_tokens_needed(steps: int, prompt_len: int = 32, warmup: int = 2) -> int:
    """KV tokens the engine sets aside per sequence for `decode_tokens_per_s(..., steps, prompt_len, warmup)`."""
    return prompt_len + 1 + warmup + steps


def decode_engine(model_path: str, num_blocks: int, device: str = "cpu", dtype: str = "float32") -> LLMEngine:
    """An engine on `model_path` to time decode on: as `load_model` builds the model (fp32 on the CPU by default),
    with a KV cache of `num_blocks` blocks of DEFAULT_BLOCK_SIZE tokens (see `decode_blocks_needed`)."""
    return LLMEngine(EngineConfig(model=model_path, device=device, dtype=dtype, block_size=DEFAULT_BLOCK_SIZE,
                                  num_blocks=num_blocks, enable_prefix_caching=False))


def decode_blocks_needed(batch: int, steps: int, prompt_len: int = 32, warmup: int = 2) -> int:
    """KV blocks `decode_tokens_per_s(engine, batch, steps, prompt_len, warmup)` takes from the engine's cache."""
    return batch * -(-decode_tokens_needed(steps, prompt_len, warmup) // DEFAULT_BLOCK_SIZE)


def decode_tokens_per_s(engine: LLMEngine, batch: int, steps: int, prompt_len: int = 32, warmup: int = 2) -> float:
    """Tokens/s of `steps` greedy decode steps of `batch` sequences at context `prompt_len` onward, after `warmup`
    steps that are not counted. The context holds placeholder K/V: a step's time depends on shapes, not values."""
    # The first timed step attends to prompt_len cached tokens plus its own, as after a prefill of prompt_len.
    times = engine.time_decode_steps(batch, prompt_len + 1, warmup + steps)
    if times is None:
        raise ValueError(f"batch={batch}: {decode_blocks_needed(batch, steps, prompt_len, warmup)} KV blocks "
                         f"needed, the engine has {engine.num_blocks}; build it with decode_engine(num_blocks=...)")
    return batch * steps / sum(times[warmup:])


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter/buffer except the embedding table, whose one
    row per token is noise, unless it is also the (tied) lm_head, which reads all of it once."""
    tied = getattr(model.lm_head, "weight", None) is model.embed_tokens.weight
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or name.startswith("rotary") or ".rotary." in name:
            continue
        if name == "embed_tokens.weight" and not tied:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def llama_cpp_decode_tokens_per_s(gguf_path: str, threads: int, steps: int, prompt_len: int = 32) -> float | None:
    """llama.cpp's batch-1 decode of a GGUF (its own kernels and weights), greedy, after a `prompt_len` prefill;
    None when llama-cpp-python is not installed (`pip install '.[peers]'`)."""
    try:
        # lazy: llama-cpp-python is an optional peer (`pip install '.[peers]'`), often not installed
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = list(range(1000, 1000 + prompt_len))
    produced, started = 0, None
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if started is None:  # the first token ends the prefill
            started = time.perf_counter()
        else:
            produced += 1
        if produced >= steps:
            break
    return produced / (time.perf_counter() - started)
