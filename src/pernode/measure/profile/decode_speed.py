"""Decode speed of a model by direct forwards through a paged KV cache (no scheduler/sampler overhead), and
llama.cpp's on a GGUF for comparison.

Batch-1 decode streams every weight once per token, so tok/s x weight bytes is the achieved bandwidth.
"""
from __future__ import annotations

import time

import torch

from pernode.serve.kernels.attention import AttentionMetadata

BLOCK = 16


@torch.inference_mode()
def decode_tokens_per_s(model, batch: int, steps: int, prompt_len: int = 32, warmup: int = 2) -> float:
    """Tokens/s of `steps` decode steps of `batch` sequences after a `prompt_len` prefill (greedy)."""
    c = model.config
    total = prompt_len + steps + warmup
    bps = -(-total // BLOCK)
    shape = (batch * bps, BLOCK, c.num_key_value_heads, c.head_dim)
    dtype = model.embed_tokens.weight.dtype
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.num_hidden_layers)]
    tables = torch.arange(batch * bps, dtype=torch.int32).view(batch, bps)

    def step(ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        slots = (tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK).flatten()
        qsl = [i * n for i in range(batch + 1)]
        seq_lens = torch.full((batch,), start + n, dtype=torch.int32)
        meta = AttentionMetadata(torch.tensor(qsl, dtype=torch.int32), seq_lens, tables, slots, n, start + n, qsl,
                                 [start + n] * batch)
        last = torch.tensor([i * n + n - 1 for i in range(batch)])
        return model(ids.flatten(), pos.repeat(batch), caches, meta, last).argmax(-1)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (batch, prompt_len), generator=gen)
    nxt = step(ids, 0, prompt_len)
    pos = prompt_len
    for _ in range(warmup):
        nxt = step(nxt[:, None], pos, 1)
        pos += 1
    started = time.perf_counter()
    for _ in range(steps):
        nxt = step(nxt[:, None], pos, 1)
        pos += 1
    return batch * steps / (time.perf_counter() - started)


def weight_bytes_per_token(model) -> int:
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
