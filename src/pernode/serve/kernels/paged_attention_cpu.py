"""Paged attention on CPU: builds, loads and calls the C++ kernel in csrc/paged_attention.h.

FlashAttention's online softmax (arXiv 2205.14135, 2307.08691) over PagedAttention's block tables (arXiv 2309.06180).
The kernel is compiled on first use (torch JIT extension) for this very CPU and cached; `python -m
pernode.serve.kernels.build` builds it ahead of time and prints where.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.kernels.jit import build_path, load_extension
from pernode.serve.kernels.kv_quant import KVCache, QuantizedKV

SOURCE = "paged_attention.cpp"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_QUANTIZED_DTYPES = (torch.int8,)  # K/V values; their per-token scales are fp32


def load_kernel() -> Callable | None:
    """The compiled op `torch.ops.pernode.paged_attention`, building it if needed; None if it can't be built."""
    return torch.ops.pernode.paged_attention if load_extension(SOURCE) else None


def kernel_supports(query: torch.Tensor, k_cache: KVCache, v_cache: KVCache) -> bool:
    """Shapes and dtypes the C++ kernel handles; anything else goes to the reference."""
    if isinstance(k_cache, QuantizedKV) and isinstance(v_cache, QuantizedKV):
        return (k_cache.data.dtype == v_cache.data.dtype
                and k_cache.data.dtype in SUPPORTED_QUANTIZED_DTYPES
                and k_cache.scale.is_contiguous() and v_cache.scale.is_contiguous()
                and _layout_supported(query, k_cache.data, v_cache.data))
    return (isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
            and k_cache.dtype == v_cache.dtype
            and k_cache.dtype in SUPPORTED_DTYPES
            and _layout_supported(query, k_cache, v_cache))


def _layout_supported(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (
        query.device.type == k_cache.device.type == v_cache.device.type == "cpu"
        and query.dtype in SUPPORTED_DTYPES
        and query.shape[-1] % 16 == 0
        and query.shape[-1] <= 512
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


def paged_attention_cpu(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: KVCache,  # [num_blocks, block_size, Hkv, D]: float, or int8 values with per-token scales
    v_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same result as `paged_attention_reference`, computed by the C++ kernel. Raises if the kernel did not build."""
    op = load_kernel()
    if op is None:
        raise RuntimeError(
            "the C++ paged attention kernel did not build (see the warning above); "
            "call pernode.serve.kernels.attention.paged_attention, which falls back to the reference"
        )
    k_scale = v_scale = None
    if isinstance(k_cache, QuantizedKV):
        (k_cache, k_scale), (v_cache, v_scale) = k_cache, v_cache
    return op(
        query,
        k_cache,
        v_cache,
        meta.block_tables.to(torch.int32),
        meta.query_start_loc.to(torch.int32),
        meta.seq_lens.to(torch.int32),
        float(scale),
        k_scale,
        v_scale,
    )


def build_kernels() -> Path | None:
    """Build the kernel now (e.g. from the Makefile) and return its build folder, or None if it failed."""
    return build_path(SOURCE)
