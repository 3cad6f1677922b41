"""Perplexity on real human-written text, by a plain full-sequence forward through our LlamaForCausalLM.

Protocol (fixed, so numbers compare across methods and runs):
  corpus     the stdlib's `pydoc_data.topics` (~465 KB of English documentation; every Python has it offline), topics
             joined in sorted-key order with blank lines; or any UTF-8 file (`--corpus FILE`).
  split      the first 10% of the characters (up to the next newline) is calibration text for GPTQ/AWQ/SmoothQuant;
             the rest is evaluation text. The two never overlap.
  tokens     the evaluation text is encoded once, without special tokens, and cut into non-overlapping windows of
             `seq_len` tokens (default 2048; 512 in quick mode); a trailing partial window is dropped; `max_windows`
             keeps the first N windows.
  score      in each window, tokens 2..L are predicted from all tokens before them in the window (L - 1 predictions);
             ppl = exp(mean NLL over all predictions of all windows), NLL in float64 from fp32 log-softmax.
  path       one full-sequence forward per window (default), or `step_tokens=N`: the window fed N tokens per
             forward with its KV cache carried, as the engine decodes. The numbers agree in exact arithmetic; they
             differ where a kernel treats small batches differently (the int4 GEMV quantizes x to int8).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydoc_data.topics import topics as pydoc_topics

from pernode.config import DEFAULT_BLOCK_SIZE
from pernode.serve.kernels.attention_metadata import AttentionMetadata, contiguous_block_tables
from pernode.serve.kernels.kv_quant import allocate_kv_cache

CALIBRATION_FRACTION = 0.10
DEFAULT_SEQ_LEN = 2048
QUICK_SEQ_LEN = 512


def corpus_text(path: str | None = None) -> str:
    """The evaluation corpus: a UTF-8 file, or (default) the stdlib's pydoc topics in sorted-key order."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    return "\n\n".join(pydoc_topics[key] for key in sorted(pydoc_topics))


def split_corpus(text: str, fraction: float = CALIBRATION_FRACTION) -> tuple[str, str]:
    """(calibration, evaluation): the first `fraction` of the characters, cut at the next newline, and the rest."""
    cut = text.find("\n", int(len(text) * fraction))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def token_windows(token_ids: list[int], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[num_windows, seq_len] int64, non-overlapping, trailing partial window dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is out of range: allowed >= 2")
    n = len(token_ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of seq_len={seq_len}: "
                         "lower --seq-len or give a longer --corpus")
    return torch.tensor(token_ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_windows(tokenizer, seq_len: int = 512, max_windows: int | None = None,
                        corpus: str | None = None, calib_file: str | None = None) -> torch.Tensor:
    """Token windows of the calibration split (disjoint from what `evaluate_perplexity` scores), or of all of
    `calib_file`, the user's own calibration text."""
    calib = corpus_text(calib_file) if calib_file else split_corpus(corpus_text(corpus))[0]
    return token_windows(tokenizer.encode(calib, add_special_tokens=False), seq_len, max_windows)


@dataclass
class Forward:
    """What one full-sequence forward of S windows of L tokens needs: positions, metadata, a scratch KV cache.

    The windows are laid end to end as S independent sequences. Every layer writes then reads the same slots within
    the call, so one cache serves all layers."""

    positions: torch.Tensor
    meta: AttentionMetadata
    kv_cache: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def build(cls, model, num_seqs: int, seq_len: int, block_size: int = DEFAULT_BLOCK_SIZE,
              kv_cache_dtype: str = "auto") -> "Forward":
        c = model.config
        dev = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        tables = contiguous_block_tables(num_seqs, seq_len, block_size)
        meta = AttentionMetadata.build(tables, [0] * num_seqs, [seq_len] * num_seqs, block_size, dev)
        shape = (tables.numel(), block_size, c.num_key_value_heads, c.head_dim)
        kv = tuple(allocate_kv_cache(shape, kv_cache_dtype, dtype, dev) for _ in "kv")
        return cls(torch.arange(seq_len).repeat(num_seqs).to(dev), meta, kv)

    def layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer(x, self.positions, self.kv_cache, self.meta)


@torch.inference_mode()
def final_hidden_states(model, windows: torch.Tensor, kv_cache_dtype: str = "auto") -> torch.Tensor:
    """Normed last hidden states [S*L, hidden] of windows [S, L] (no KV cache carried between windows)."""
    num_seqs, seq_len = windows.shape
    fwd = Forward.build(model, num_seqs, seq_len, kv_cache_dtype=kv_cache_dtype)
    x = model.embed_tokens(windows.flatten().to(fwd.positions.device))
    for layer in model.layers:
        x = fwd.layer(layer, x)
    return model.norm(x)


@torch.inference_mode()
def window_nll(model, window: torch.Tensor, chunk: int = 512, kv_cache_dtype: str = "auto") -> tuple[float, int]:
    """Sum of NLL (nats, float64) of tokens 2..L of one window, and the count; logits made `chunk` rows at a time."""
    h = final_hidden_states(model, window[None], kv_cache_dtype)
    targets = window[1:].to(h.device)
    total = 0.0
    for i in range(0, targets.numel(), chunk):
        logits = model.lm_head(h[i:i + chunk][: targets.numel() - i]).float()
        total += F.cross_entropy(logits, targets[i:i + chunk], reduction="sum").double().item()
    return total, targets.numel()


@torch.inference_mode()
def window_nll_stepped(model, window: torch.Tensor, step_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE,
                       kv_cache_dtype: str = "auto") -> tuple[float, int]:
    """`window_nll` with the window fed `step_tokens` tokens per forward through a carried paged KV cache."""
    c = model.config
    dev, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    seq_len = window.numel()
    table = contiguous_block_tables(1, seq_len, block_size)
    shape = (table.numel(), block_size, c.num_key_value_heads, c.head_dim)
    caches = [tuple(allocate_kv_cache(shape, kv_cache_dtype, dtype, dev) for _ in "kv")
              for _ in range(c.num_hidden_layers)]
    window = window.to(dev)
    total = 0.0
    for start in range(0, seq_len - 1, step_tokens):
        n = min(step_tokens, seq_len - 1 - start)
        pos = torch.arange(start, start + n, device=dev)
        meta = AttentionMetadata.build(table, [start], [n], block_size, dev)
        logits = model(window[start:start + n], pos, caches, meta).float()
        total += F.cross_entropy(logits, window[start + 1:start + n + 1], reduction="sum").double().item()
    return total, seq_len - 1


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_tokens: int  # predictions scored
    num_windows: int
    seq_len: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_windows * self.seq_len / self.elapsed_s


def evaluate_perplexity(model, tokenizer, seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = None,
                        corpus: str | None = None, split: bool = True, progress=None,
                        step_tokens: int | None = None, kv_cache_dtype: str = "auto") -> PerplexityResult:
    """Perplexity of `model` on the evaluation split (or the whole `corpus` file when split=False); with
    `step_tokens`, each window is fed that many tokens per forward, the way decode runs; with kv_cache_dtype int8
    or fp8, K/V go through a quantized cache as they are served (serve/kernels/kv_quant.py)."""
    if step_tokens is not None and step_tokens < 1:
        raise ValueError(f"step_tokens={step_tokens} is out of range: allowed >= 1")
    text = corpus_text(corpus)
    if split:
        text = split_corpus(text)[1]
    windows = token_windows(tokenizer.encode(text, add_special_tokens=False), seq_len, max_windows)
    started = time.perf_counter()
    nll, count = 0.0, 0
    for i, window in enumerate(windows):
        s, n = (window_nll(model, window, kv_cache_dtype=kv_cache_dtype) if step_tokens is None
                else window_nll_stepped(model, window, step_tokens, kv_cache_dtype=kv_cache_dtype))
        nll, count = nll + s, count + n
        if progress:
            progress(i + 1, len(windows), math.exp(nll / count))
    mean = nll / count
    return PerplexityResult(math.exp(mean), mean, count, len(windows), seq_len, time.perf_counter() - started)
