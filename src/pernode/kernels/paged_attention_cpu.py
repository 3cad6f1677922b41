"""Paged attention on CPU: builds, loads and calls the C++ kernel in csrc/paged_attention.cpp.

FlashAttention's online softmax (arXiv 2205.14135, 2307.08691) over PagedAttention's block tables (arXiv 2309.06180).
The kernel is compiled on first use (torch JIT extension) for this very CPU and cached; `python -m
pernode.kernels.paged_attention_cpu` builds it ahead of time and prints where.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Callable

import torch

from pernode.kernels.attention import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# -march=native: the vector code is specialised for the CPU it runs on, which is why the CPU is in the build key.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_cache_dir() -> Path:
    """Where compiled kernels live: $PERNODE_KERNEL_CACHE, else ~/.cache/pernode/kernels."""
    env = os.environ.get("PERNODE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pernode" / "kernels"


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))
    except OSError:
        return platform.processor() + platform.machine()


def build_name() -> str:
    """Extension name, keyed by everything that changes the binary: source, flags, torch version, CPU."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return f"pernode_paged_attention_{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def load_kernel() -> Callable | None:
    """The compiled op `torch.ops.pernode.paged_attention`, building it if needed; None (one warning) if it can't."""
    try:
        from torch.utils import cpp_extension

        name = build_name()
        build_dir = kernel_cache_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        # is_python_module=False: the op registers itself with the dispatcher, so no pybind11/Python headers to compile.
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.pernode.paged_attention
    except Exception as exc:  # a missing compiler or ninja must not stop serving: the reference still works
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning(
            "pernode: C++ paged attention kernel unavailable (%s); using the plain-torch reference", reason
        )
        return None


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
            "call pernode.kernels.attention.paged_attention, which falls back to the reference"
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
    if load_kernel() is None:
        return None
    return kernel_cache_dir() / build_name()


if __name__ == "__main__":
    import sys
    import time

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    where = build_kernels()
    if where is None:
        sys.exit("paged attention kernel: build failed")
    print(f"paged attention kernel: {where} ({time.perf_counter() - t0:.1f} s)")
