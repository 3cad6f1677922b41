"""The paged KV cache's storage: a float dtype (`auto`: float16 under fp32 compute, else the compute dtype), or
quantized: int8 (any device) or fp8 e4m3 (CUDA) K/V, each with one fp32 scale per token per kv head.

Quantized KV caches as in FlexGen (Sheng et al., arXiv 2303.06865) and KVQuant (Hooper et al., arXiv 2401.18079);
absmax scales per vector as in LLM.int8() (Dettmers et al., arXiv 2208.07339).

Scheme, and why. A block fills over many steps (a prompt chunk, then one decode token at a time), so one scale per
block would have to be either guessed from its first tokens (a later, larger token clips) or grown by re-quantizing
the tokens already there (a second rounding, and writes that touch old slots). One scale per (token, kv head) makes
every write independent of what is cached: quantize the new rows, store them and their scales, never look back.
Each block carries its tokens' scales beside their values ([num_blocks, block_size, num_kv_heads] fp32), so a
block is still the unit that is allocated, shared by the prefix cache and freed. The price is 4 bytes per head per
token next to head_dim bytes of values: 6% at head_dim 64, 3% at 128.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pernode.config import KV_CACHE_DTYPES, ModelConfig

SCALE_BYTES = 4  # one fp32 scale per (token, kv head)
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FLOAT_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # largest magnitude each storage type holds
_MIN_SCALE = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero


class QuantizedKV(NamedTuple):
    """One layer's K (or V) cache, quantized: `data` holds values / scale, `scale` the per-token, per-head scales."""

    data: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] int8 or float8_e4m3fn
    scale: torch.Tensor  # [num_blocks, block_size, num_kv_heads] float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device


KVCache = torch.Tensor | QuantizedKV  # one layer's K or V cache, float or quantized


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device | None = None) -> None:
    """ValueError naming kv_cache_dtype unless it is allowed (on `device`, when given)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported: allowed {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype == "fp8" and device is not None and device.type != "cuda":
        allowed = ", ".join(d for d in KV_CACHE_DTYPES if d != "fp8")
        raise ValueError(f"kv_cache_dtype=fp8 needs a CUDA device (got {device}): allowed on CPU are {allowed}")


def resolve_kv_cache_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> str:
    """The storage the engine gives `auto`: float16 under float32 compute, else the compute dtype's own.

    Decode attention at large batches reads K/V from blocks scattered over DRAM, at a third of the bandwidth a stream
    gets; half the bytes made the mixed offline workload ~8% faster on fp32 CPUs (docs/benchmarks.md, with the
    perplexity cost). float16 keeps 10 bits of mantissa, bfloat16 only 7; llama.cpp's default cache is f16 too.
    Other names pass through."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype != "auto":
        return kv_cache_dtype
    if compute_dtype == torch.float32:
        return "float16"
    return next(name for name, dtype in FLOAT_STORAGE.items() if dtype == compute_dtype)


def kv_bytes_per_token(config: ModelConfig, float_bytes: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V (values and their scales) one token occupies across all layers."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto":
        return config.kv_bytes_per_token(float_bytes)
    if kv_cache_dtype in FLOAT_STORAGE:
        return config.kv_bytes_per_token(FLOAT_STORAGE[kv_cache_dtype].itemsize)
    per_head = config.head_dim * 1 + SCALE_BYTES  # both storage types are one byte per value
    return 2 * config.num_hidden_layers * config.num_key_value_heads * per_head


def allocate_kv_cache(shape: tuple[int, int, int, int], kv_cache_dtype: str, float_dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor | QuantizedKV:
    """A zeroed cache of [num_blocks, block_size, num_kv_heads, head_dim]: a float tensor (`float_dtype` for auto,
    here unresolved; or the float type named), or a QuantizedKV."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto" or kv_cache_dtype in FLOAT_STORAGE:
        return torch.zeros(shape, dtype=FLOAT_STORAGE.get(kv_cache_dtype, float_dtype), device=device)
    return QuantizedKV(torch.zeros(shape, dtype=_STORAGE[kv_cache_dtype], device=device),
                       torch.zeros(shape[:3], dtype=torch.float32, device=device))


def quantize_rows(x: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] in `storage`, scales [...] fp32) with x ~= values * scale."""
    qmax = _QMAX[storage]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp_min(_MIN_SCALE)
    q = xf / scale.unsqueeze(-1)
    if storage == torch.int8:
        q = q.round_()
    return q.clamp_(-qmax, qmax).to(storage), scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values [..., D] * scales [...] as `dtype`."""
    return (data.float() * scale.unsqueeze(-1)).to(dtype)


def write_quantized(x: torch.Tensor, cache: QuantizedKV, slot_mapping: torch.Tensor) -> None:
    """Quantize x [T, Hkv, D] and scatter values and scales into the cache slots `slot_mapping` [T]."""
    num_blocks, block_size, hkv, d = cache.data.shape
    q, scale = quantize_rows(x, cache.data.dtype)
    # as raw bytes: index_copy_ has no float8 kernels on every device
    cache.data.view(torch.uint8).view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, q.view(torch.uint8))
    cache.scale.view(num_blocks * block_size, hkv).index_copy_(0, slot_mapping, scale)


def gather_blocks(cache: torch.Tensor | QuantizedKV, blocks: torch.Tensor) -> torch.Tensor:
    """The cache's blocks `blocks` [n] as [n, block_size, Hkv, D]: as stored, or dequantized to fp32."""
    if isinstance(cache, QuantizedKV):
        values = cache.data.view(torch.uint8)[blocks].view(cache.data.dtype)  # gathered as bytes, as written
        return dequantize(values, cache.scale[blocks])
    return cache[blocks]
