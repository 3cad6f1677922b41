"""Paged attention on CPU: builds, loads and calls the C++ kernel in csrc/paged_attention.cpp.

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

SOURCE = "paged_attention.cpp"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_kernel() -> Callable | None:
    """The compiled op `torch.ops.pernode.paged_attention`, building it if needed; None if it can't be built."""
    return torch.ops.pernode.paged_attention if load_extension(SOURCE) else None


def kernel_supports(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Shapes and dtypes the C++ kernel handles; anything else goes to the reference."""
    return (
        query.device.type == k_cache.device.type == v_cache.device.type == "cpu"
        and query.dtype in SUPPORTED_DTYPES
        and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in SUPPORTED_DTYPES
        and query.shape[-1] % 16 == 0
        and query.shape[-1] <= 512
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


def paged_attention_cpu(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
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
    return op(
        query,
        k_cache,
        v_cache,
        meta.block_tables.to(torch.int32),
        meta.query_start_loc.to(torch.int32),
        meta.seq_lens.to(torch.int32),
        float(scale),
    )


def build_kernels() -> Path | None:
    """Build the kernel now (e.g. from the Makefile) and return its build folder, or None if it failed."""
    return build_path(SOURCE)
