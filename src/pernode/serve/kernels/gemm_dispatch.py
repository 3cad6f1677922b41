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

import functools
import hashlib
import json
import logging
import math
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
METHOD = "lines-8-64"  # in every key: entries measured by an older method are measured again
# Each kernel's time is close to linear in the row count (the GEMV re-streams the weights every 4 rows; the GEMM
# pays the tile dequantisation once, then compute per row), so two row counts per kernel fix its line, and the
# crossover is where the lines meet. Four timed points resist a shared, noisy CPU better than a sweep of many.
FIT_ROWS = (8, 64)
# The GEMV passes over the weights once per 4 rows (csrc/quant_linear.cpp kMaxGemvRows): below that it does the
# least work any kernel can, so a measured crossover under it is noise from a busy CPU.
MIN_ROWS = 4
MAX_ROWS = 4096  # beyond this the GEMM wins on any CPU; also the answer when the lines never cross that way
NEVER = 1 << 30  # the GEMM is never faster: keep the GEMV
_REPEATS = 5  # best of, interleaved: the least disturbed measurement of each

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
        return (f"{METHOD}|{_build_and_machine(kernel_source)}|N={self.out_features}|K={self.in_features}"
                f"|w{self.num_bits}g{self.group_size}|zero={int(self.has_zero_term)}|x8={int(self.int8_input)}"
                f"|{str(self.dtype).removeprefix('torch.')}|threads={self.num_threads}")


@functools.lru_cache(maxsize=None)
def _build_and_machine(kernel_source: str) -> str:
    """The kernel binary's name (hash of its source, flags, torch, CPU) and a hash of the CPU: read once, not per
    layer."""
    return f"{build_name(kernel_source)}|cpu={hashlib.sha256(cpu_signature().encode()).hexdigest()[:12]}"


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


def _best_times_s(fns: list[Callable[[], torch.Tensor]]) -> list[float]:
    """Best-of-_REPEATS wall time of each function, run interleaved so a burst of load hits all alike."""
    for fn in fns:
        fn()  # warm: first-touch allocations, oneDNN primitive creation
    best = [float("inf")] * len(fns)
    for _ in range(_REPEATS):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def crossover_of_lines(rows: tuple[int, int], gemv_s: tuple[float, float], gemm_s: tuple[float, float]) -> int:
    """Smallest row count at which the GEMM's line (through its two timed points) is at or below the GEMV's."""
    (m0, m1) = rows
    slope_v, slope_g = (gemv_s[1] - gemv_s[0]) / (m1 - m0), (gemm_s[1] - gemm_s[0]) / (m1 - m0)
    base_v, base_g = gemv_s[0] - slope_v * m0, gemm_s[0] - slope_g * m0
    if base_g <= base_v and slope_g <= slope_v:
        return MIN_ROWS
    if slope_g >= slope_v:  # the GEMM grows at least as fast per row: it never catches up
        return NEVER
    return max(MIN_ROWS, min(MAX_ROWS, math.ceil((base_g - base_v) / (slope_v - slope_g))))


def measure_crossover(gemv: Callable[[torch.Tensor], torch.Tensor], gemm: Callable[[torch.Tensor], torch.Tensor],
                      in_features: int, dtype: torch.dtype, rows: tuple[int, int] = FIT_ROWS) -> int:
    """The row count from which the GEMM is at least as fast as the GEMV, from each kernel timed at two counts."""
    generator = torch.Generator().manual_seed(0)
    x_all = torch.randn(max(rows), in_features, generator=generator).to(dtype)
    xs = [x_all[:m] for m in rows]
    with torch.inference_mode():
        t = _best_times_s([lambda: gemv(xs[0]), lambda: gemv(xs[1]), lambda: gemm(xs[0]), lambda: gemm(xs[1])])
    return crossover_of_lines(rows, (t[0], t[1]), (t[2], t[3]))


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
        if cached is not None and cached < MIN_ROWS:  # a hand-edited or corrupt entry
            cached = None
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
