"""GEMV or GEMM for a quantized linear step, from crossovers measured on this CPU (the roofline's two regimes:
Williams, Waterman, Patterson, "Roofline", CACM 2009).

A decode-sized step reads every weight once for a few rows of x: memory-bound, so the int4/int8 GEMV that streams
the packed weights wins. A prefill chunk or a large decode batch does M multiply-adds per weight: compute-bound, so
dequantizing tiles to the activations' dtype and running the fastest GEMM the CPU has (bf16 with AVX512_BF16/AMX)
wins. Where one overtakes the other depends on the CPU, the layer's shape, the dtype and the thread count, so it is
measured, once per (shape, format, dtype, threads, CPU, kernel build), over a few row counts, and cached in
<kernel cache>/gemm_crossovers.json. PERNODE_GEMM_FROM_ROWS fixes it instead (tests, experiments).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pernode import envs
from pernode.serve.kernels.jit import build_name, cpu_signature

log = logging.getLogger(__name__)

CACHE_FILE = "gemm_crossovers.json"
CANDIDATE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
NEVER = 1 << 30  # the GEMM never won up to the largest row count tried: keep the GEMV
_REPEATS = 3  # best of: the machine may be shared, and the minimum is the least disturbed measurement

_lock = threading.Lock()
_memory: dict[str, int] = {}


@dataclass(frozen=True)
class LinearShape:
    """What a crossover depends on, besides the machine."""

    out_features: int
    in_features: int
    num_bits: int
    group_size: int
    has_zero_term: bool
    int8_input: bool
    dtype: torch.dtype
    num_threads: int

    def key(self, kernel_source: str) -> str:
        machine = hashlib.sha256(cpu_signature().encode()).hexdigest()[:12]
        return (f"{build_name(kernel_source)}|cpu={machine}|N={self.out_features}|K={self.in_features}"
                f"|w{self.num_bits}g{self.group_size}|zero={int(self.has_zero_term)}|x8={int(self.int8_input)}"
                f"|{str(self.dtype).removeprefix('torch.')}|threads={self.num_threads}")


def _cache_path():
    return envs.kernel_cache_dir() / CACHE_FILE


def _read_cache() -> dict[str, int]:
    try:
        data = json.loads(_cache_path().read_text())
        return {k: int(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def _write_cache(entries: dict[str, int]) -> None:
    """Merge into the cache file atomically (several processes may calibrate at once)."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_cache(), **entries}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".crossovers")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a re-measurement next start
        log.debug("gemm crossovers not cached: %s", exc)


def _best_time_s(fn: Callable[[], torch.Tensor]) -> float:
    fn()  # warm: first-touch allocations, oneDNN primitive creation
    best = float("inf")
    for _ in range(_REPEATS):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure_crossover(gemv: Callable[[torch.Tensor], torch.Tensor], gemm: Callable[[torch.Tensor], torch.Tensor],
                      in_features: int, dtype: torch.dtype, rows: tuple[int, ...] = CANDIDATE_ROWS) -> int:
    """The smallest row count from which the GEMM is at least as fast as the GEMV at every larger count tried
    (NEVER if it never is). Stops once the GEMM has won twice in a row: beyond that the gap only grows."""
    generator = torch.Generator().manual_seed(0)
    x_all = torch.randn(max(rows), in_features, generator=generator).to(dtype)
    wins: list[int] = []
    with torch.inference_mode():
        for m in rows:
            x = x_all[:m]
            gemm_wins = _best_time_s(lambda: gemm(x)) <= _best_time_s(lambda: gemv(x))
            wins = wins + [m] if gemm_wins else []
            if len(wins) == 2:
                return wins[0]
    return wins[0] if wins else NEVER


def gemm_from_rows(shape: LinearShape, kernel_source: str, gemv: Callable[[torch.Tensor], torch.Tensor],
                   gemm: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Row count from which this layer runs the GEMM: PERNODE_GEMM_FROM_ROWS, else the cached or newly measured
    crossover."""
    forced = envs.gemm_from_rows()
    if forced is not None:
        return forced
    key = shape.key(kernel_source)
    with _lock:
        if key in _memory:
            return _memory[key]
        cached = _read_cache().get(key)
        if cached is None:
            started = time.perf_counter()
            cached = measure_crossover(gemv, gemm, shape.in_features, shape.dtype)
            _write_cache({key: cached})
            log.info("gemm crossover %s x %s w%d %s: GEMM from %s rows (measured in %.2f s)", shape.out_features,
                     shape.in_features, shape.num_bits, str(shape.dtype).removeprefix("torch."),
                     "never" if cached == NEVER else cached, time.perf_counter() - started)
        _memory[key] = cached
        return cached


def forget_measurements() -> None:
    """Drop the in-process crossovers (tests; the file cache stays)."""
    with _lock:
        _memory.clear()
