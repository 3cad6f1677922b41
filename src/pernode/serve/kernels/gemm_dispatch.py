"""GEMV or GEMM for a quantized linear step, from crossovers measured on this CPU (the roofline's two regimes:
Williams, Waterman, Patterson, "Roofline", CACM 2009).

A decode-sized step reads every weight once for a few rows of x: memory-bound, so the int4/int8 GEMV that streams
the packed weights wins. A prefill chunk or a large decode batch does M multiply-adds per weight: compute-bound, so
dequantizing tiles to the activations' dtype and running the fastest GEMM the CPU has (bf16 with AVX512_BF16/AMX)
wins. Where one overtakes the other depends on the CPU, the layer's shape, the dtype and the thread count, so it is
measured, once per (shape, format, dtype, threads, CPU, kernel build), and cached in
<kernel cache>/gemm_crossovers.json.

A shared CPU makes single timings lie, so: the two kernels run interleaved, 7 times at each of a doubling ladder of
row counts; the crossing of the median time ratios is the answer, found between two measured row counts; and it is cached only
when the rounds, each taken alone, mostly agree with it (else it is measured again, pooled, up to 3 times, and an
unsettled answer serves this process only). PERNODE_GEMM_FROM_ROWS fixes the crossover instead (tests,
experiments); PERNODE_REMEASURE_KERNELS=1 (or `pernode profile --remeasure-kernels`) measures again and replaces
the cached values. docs/threads.md ("GEMV or GEMM") shows the cost and the measured values.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import statistics
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
# In every key: entries measured by an older method are measured again (and dropped from the file when it is next
# written). "lines-8-64" (two row counts, best of 5, extrapolated lines) kept single noisy measurements forever.
METHOD = "ladder-median-v2"
# Row counts probed, doubling: the crossing is found between two measured neighbours, never extrapolated. The ladder
# stops once the GEMM has won at two probes in a row, so a layer that crosses at 16 rows is never timed at 256.
PROBE_ROWS = (4, 8, 16, 32, 64, 128, 256)
# The GEMV passes over the weights once per 8 rows (csrc/quant_linear.h kMaxGemvRows); under 4 rows it does the
# least work any kernel can, so the GEMM is never chosen there. Crossovers are keyed by the kernel binary's build
# hash (_build_and_machine), so a changed GEMV is measured afresh without a new METHOD.
MIN_ROWS = 4
NEVER = 1 << 30  # the GEMM was not faster at any probed row count: keep the GEMV
ROUNDS = 7  # timed pairs per row count; the decision uses the median of the pairs' time ratios
# Each sample repeats a small layer's call until it lasts about this long: long enough for the clock, short enough
# that most samples on a busy CPU see no preemption at all (the noise only adds time, and the median drops it).
SAMPLE_S = 2e-4
MAX_CALLS = 16
# A layer shape stops climbing the ladder, and is not re-measured, once its measurement has taken this long: a
# 49152-row lm_head timed at 256 rows on a busy CPU would otherwise hold the start for minutes.
BUDGET_S = 3.0
MAX_ATTEMPTS = 3  # measurements pooled before an unsettled crossover is used without being cached
# A crossover is settled when at least this share of the rounds, each taken alone, put the crossing within a factor
# of 2 (one probe step) of the medians' crossing.
AGREEMENT = 0.6

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
    # The two kernels compared, "slower-at-few-rows/faster-at-many": the GEMV against the GEMM, or (int4 with int8
    # x) the GEMV against the panel kernel, and the GEMV-or-panel decode kernel against the GEMM.
    kernels: str = "gemv/gemm"

    def key(self, kernel_source: str) -> str:
        pair = "" if self.kernels == "gemv/gemm" else f"|{self.kernels}"
        return (f"{METHOD}|{_build_and_machine(kernel_source)}|N={self.out_features}|K={self.in_features}"
                f"|w{self.num_bits}g{self.group_size}|zero={int(self.has_zero_term)}|x8={int(self.int8_input)}"
                f"|{str(self.dtype).removeprefix('torch.')}|threads={self.num_threads}{pair}")


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


def _write_cache(entries: dict[str, int], keep_cached: bool = True) -> None:
    """Merge into the cache file atomically (several processes may calibrate at once); entries of older methods
    go."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        current = {k: v for k, v in _read_cache().items() if k.startswith(f"{METHOD}|")} if keep_cached else {}
        merged = {**current, **entries}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".crossovers")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a re-measurement next start
        log.debug("gemm crossovers not cached: %s", exc)


@dataclass(frozen=True)
class CrossoverEstimate:
    """The row count from which the GEMM runs (NEVER: keep the GEMV), and how far the rounds agree on it."""

    rows: int
    agreement: float  # share of rounds whose own crossing lies within a factor 2 of `rows`

    @property
    def settled(self) -> bool:
        return self.agreement >= AGREEMENT


def crossing(probe_rows: tuple[int, ...], ratios: list[float]) -> int:
    """Smallest row count from which the GEMM is at least as fast as the GEMV, from the GEMM/GEMV time ratio at each
    probed row count: the first probe from which the GEMM wins at every larger probe, the crossing placed between it
    and the probe below by linear interpolation of the ratio (never extrapolated past the probes)."""
    first = len(ratios)
    while first > 0 and ratios[first - 1] <= 1.0:
        first -= 1
    if first == len(ratios):
        return NEVER
    if first == 0:
        return max(MIN_ROWS, probe_rows[0])
    (r0, r1), (d0, d1) = probe_rows[first - 1:first + 1], ratios[first - 1:first + 1]  # d0 > 1 >= d1
    return max(MIN_ROWS, math.ceil(r0 + (r1 - r0) * (d0 - 1.0) / (d0 - d1)))


def _within_factor_2(a: int, b: int, probe_rows: tuple[int, ...]) -> bool:
    # NEVER compares as one probe step beyond the ladder: a round that crossed at its top probe agrees with it.
    beyond = 2 * probe_rows[-1]
    a, b = min(a, beyond), min(b, beyond)
    return max(a, b) <= 2 * min(a, b)


def crossover_from_samples(probe_rows: tuple[int, ...], gemv_samples: list[list[float]],
                           gemm_samples: list[list[float]]) -> CrossoverEstimate:
    """The crossover from repeated timings: samples[i][k] is round k's time at probe_rows[i] (seconds), the two
    kernels' k-th samples taken back to back. The crossing of the median GEMM/GEMV ratios is the answer; each
    round's own crossing says whether the rounds agree on it."""
    if not probe_rows or len(gemv_samples) != len(probe_rows) or len(gemm_samples) != len(probe_rows):
        raise ValueError("crossover_from_samples: one list of samples per probed row count for each kernel")
    rounds = {len(s) for s in gemv_samples + gemm_samples}
    if len(rounds) != 1 or 0 in rounds:
        raise ValueError(f"crossover_from_samples: every row count needs the same number (>= 1) of samples, "
                         f"got {sorted(rounds)}")
    num_rounds = rounds.pop()
    # Ratios of the two kernels timed back to back: load that drifts between rounds cancels within a pair.
    ratios = [[g / v if v > 0 else math.inf for v, g in zip(vs, gs)] for vs, gs in zip(gemv_samples, gemm_samples)]
    rows = crossing(probe_rows, [statistics.median(r) for r in ratios])
    per_round = [crossing(probe_rows, [r[k] for r in ratios]) for k in range(num_rounds)]
    agreeing = sum(_within_factor_2(c, rows, probe_rows) for c in per_round)
    return CrossoverEstimate(rows, agreeing / num_rounds)


def time_probes(gemv: Callable[[torch.Tensor], torch.Tensor], gemm: Callable[[torch.Tensor], torch.Tensor],
                in_features: int, dtype: torch.dtype, probe_rows: tuple[int, ...] = PROBE_ROWS,
                rounds: int = ROUNDS, stop_early: bool = True, budget_s: float = math.inf
                ) -> tuple[tuple[int, ...], list[list[float]], list[list[float]]]:
    """Time both kernels `rounds` times at each probed row count, the two interleaved (and which goes first
    alternating) so a burst of load hits both alike. With `stop_early`, climbs the ladder only until the GEMM's
    median has won at two probes in a row, and until `budget_s` has passed. Returns (probed rows, GEMV samples, GEMM
    samples)."""
    started_all = time.perf_counter()
    x_all = torch.randn(max(probe_rows), in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    probed: list[int] = []
    gemv_samples: list[list[float]] = []
    gemm_samples: list[list[float]] = []
    wins_in_a_row = 0
    with torch.inference_mode():
        for m in probe_rows:
            x = x_all[:m]
            gemv(x), gemm(x)  # warm: first-touch allocations, oneDNN primitive creation
            started = time.perf_counter()
            gemv(x)
            calls = max(1, min(MAX_CALLS, math.ceil(SAMPLE_S / max(time.perf_counter() - started, 1e-7))))
            pair: tuple[list[float], list[float]] = ([], [])
            for k in range(rounds):
                for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                    fn = gemv if which == 0 else gemm
                    started = time.perf_counter()
                    for _ in range(calls):
                        fn(x)
                    pair[which].append((time.perf_counter() - started) / calls)
            probed.append(m)
            gemv_samples.append(pair[0])
            gemm_samples.append(pair[1])
            wins = statistics.median(g / v for v, g in zip(*pair)) <= 1.0
            wins_in_a_row = wins_in_a_row + 1 if wins else 0
            if (stop_early and wins_in_a_row == 2) or time.perf_counter() - started_all > budget_s:
                break
    return tuple(probed), gemv_samples, gemm_samples


def measure_crossover(gemv: Callable[[torch.Tensor], torch.Tensor], gemm: Callable[[torch.Tensor], torch.Tensor],
                      in_features: int, dtype: torch.dtype, max_attempts: int = MAX_ATTEMPTS) -> CrossoverEstimate:
    """Measure until the rounds agree (at most `max_attempts` times, samples pooled row count by row count, within
    about BUDGET_S)."""
    started = time.perf_counter()
    probed, gemv_s, gemm_s = time_probes(gemv, gemm, in_features, dtype, budget_s=BUDGET_S)
    estimate = crossover_from_samples(probed, gemv_s, gemm_s)
    for _ in range(max_attempts - 1):
        if estimate.settled or time.perf_counter() - started > BUDGET_S:
            break
        # Again over the same row counts, pooled with what was measured: the medians steady as samples accrue.
        _, more_v, more_g = time_probes(gemv, gemm, in_features, dtype, probed, stop_early=False)
        gemv_s = [a + b for a, b in zip(gemv_s, more_v)]
        gemm_s = [a + b for a, b in zip(gemm_s, more_g)]
        estimate = crossover_from_samples(probed, gemv_s, gemm_s)
    return estimate


def gemm_from_rows(shape: LinearShape, kernel_source: str, gemv: Callable[[torch.Tensor], torch.Tensor],
                   gemm: Callable[[torch.Tensor], torch.Tensor], gemm_setting: bool = True) -> int:
    """Row count from which this layer runs `gemm` instead of `gemv` (the GEMM; or another pair shape.kernels
    names): PERNODE_GEMM_FROM_ROWS when `gemm_setting` (the pair is the GEMV and the GEMM), else the cached or newly
    measured crossover (PERNODE_REMEASURE_KERNELS=1 measures again and replaces the cached one)."""
    # Other pairs' settings (PERNODE_PANEL_FROM_ROWS, ...) are read by the layer, which asks here only to measure
    forced = envs.gemm_from_rows() if gemm_setting else None
    if forced is not None:
        return forced
    key = shape.key(kernel_source)
    with _lock:
        if key in _memory:
            return _memory[key]
        cached = None if envs.remeasure_kernels() else _read_cache().get(key)
        if cached is not None and cached < MIN_ROWS:  # a hand-edited or corrupt entry
            cached = None
        if cached is None:
            started = time.perf_counter()
            estimate = measure_crossover(gemv, gemm, shape.in_features, shape.dtype)
            cached = estimate.rows
            if estimate.settled:
                _write_cache({key: cached})
            else:  # used in this process only: the next start measures again
                log.warning("gemm crossover %s x %s: rounds disagree (%.0f%% agree) after %d measurements; using "
                            "%s rows without caching it (a busy CPU?)", shape.out_features, shape.in_features,
                            100 * estimate.agreement, MAX_ATTEMPTS, "never" if cached == NEVER else cached)
            log.info("crossover %s x %s w%d %s, %s: the second from %s rows (%.0f%% of rounds agree; measured in "
                     "%.2f s)", shape.out_features, shape.in_features, shape.num_bits,
                     str(shape.dtype).removeprefix("torch."), shape.kernels,
                     "never" if cached == NEVER else cached, 100 * estimate.agreement,
                     time.perf_counter() - started)
        _memory[key] = cached
        return cached


def forget_cached_crossovers() -> None:
    """Empty the cache file and this process's memory: every layer shape is measured again at its next load."""
    with _lock:
        _memory.clear()
        if _cache_path().exists():
            _write_cache({}, keep_cached=False)


def forget_measurements() -> None:
    """Drop the in-process crossovers (tests; the file cache stays)."""
    with _lock:
        _memory.clear()
