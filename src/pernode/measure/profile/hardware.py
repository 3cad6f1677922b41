"""This machine's peaks, measured: memory read bandwidth and matmul FLOP/s in fp32, bf16, int8 (and fp8 on GPUs).

The roofline needs a ceiling the hardware can actually reach with the kernels we have, so the peaks are measured
with plain torch ops (best of a few runs) rather than read from a spec sheet; each records the kernel that set it.
Published datasheet peaks of other accelerators live in accelerators.py, and projection onto them in projection.py.
"""
from __future__ import annotations

import math
import os
import platform
import time
from typing import Callable

import torch

from pernode.measure.profile.profile_schema import HardwareSection

# Sizes: large enough to leave the caches (bandwidth) and to fill the matmul units (FLOPs), small enough to run
# in a few seconds on a 2-core CPU. `quick` is for tests.
CPU_SIZES = {"bandwidth_mib": 256, "mm_n": 2048, "int8_n": 1536}
CPU_QUICK_SIZES = {"bandwidth_mib": 64, "mm_n": 512, "int8_n": 512}
CUDA_SIZES = {"bandwidth_mib": 2048, "mm_n": 8192, "int8_n": 8192}


# Timing stops repeating past this many seconds: a format without fast units here (int8 without VNNI or AMX: torch's
# _int_mm ran 1.6 GFLOP/s, ~5 s a call) is no peak, and three more calls of it cost the profile a minute.
TIMING_BUDGET_S = 2.0


def _time_best_s(fn: Callable[[], object], device, repeats: int, inner: int) -> tuple[float, int]:
    """Best (least) time of one call to `fn`, over up to `repeats` timings of `inner` back-to-back calls each (fewer,
    at least one, once TIMING_BUDGET_S has passed); and how many timings that took."""
    started = time.perf_counter()
    fn()  # warm-up: allocation, kernel selection, page faults
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    best, timings = math.inf, 0
    while timings < repeats and (timings == 0 or time.perf_counter() - started < TIMING_BUDGET_S):
        timings += 1
        if cuda:
            # Events time the GPU's own work, not the host's launch overhead.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            t = time.perf_counter() - t0
        best = min(best, t / inner)
    return best, timings


def measure_bandwidth_gbs(device, size_mib: int, repeats: int = 5, inner: int = 1) -> tuple[float, str]:
    """Read bandwidth of a full-tensor sum: every byte read once, the result is one number."""
    x = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    t, timings = _time_best_s(lambda: x.sum(), device, repeats, inner)
    return x.numel() * 4 / t / 1e9, f"torch.sum over a {size_mib} MiB float32 tensor, best of {timings}"


def measure_matmul_flops(device, dtype_name: str, n: int, repeats: int = 3, inner: int = 1) -> tuple[float, str]:
    """FLOP/s of an n x n x n matmul (2*n^3 FLOPs) in fp32, bf16, int8 (torch._int_mm) or fp8 (torch._scaled_mm)."""
    if dtype_name == "int8":
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
        fn, kernel = (lambda: torch._int_mm(a, b)), f"torch._int_mm int8 -> int32, {n}x{n}x{n}"
    elif dtype_name == "fp8":
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # _scaled_mm wants column-major b
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        kernel = f"torch._scaled_mm float8_e4m3fn -> bf16, {n}x{n}x{n}"
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        fn, kernel = (lambda: torch.mm(a, b)), f"torch.mm {dtype_name}, {n}x{n}x{n}"
        if dtype_name == "fp32" and device.type == "cuda":
            kernel += " (TF32 " + ("on" if torch.backends.cuda.matmul.allow_tf32 else "off") + ")"
    t, timings = _time_best_s(fn, device, repeats, inner)
    return 2.0 * n**3 / t, f"{kernel}, best of {timings}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cpu_memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # A container's limit is the memory we can actually use.
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def measure_peaks(device: str | None = None, quick: bool = False) -> HardwareSection:
    """The profile's `hardware` section for this machine, measured (a few seconds; `quick` for tests).

    `peak_flops` keeps fp32, bf16, int8 (and fp8 on GPUs that have it); a format with no fast path here (bf16
    slower than fp32 on a CPU without bf16 units) is None there, with the measured number under
    `measured_flops` and a note.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes: list[str] = []
    if dev.type == "cuda":
        sizes, inner = CUDA_SIZES, 10
        props = torch.cuda.get_device_properties(dev)
        name, memory_bytes = props.name, int(props.total_memory)
    else:
        sizes, inner = (CPU_QUICK_SIZES if quick else CPU_SIZES), 1
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        memory_bytes = _cpu_memory_bytes()
    if quick and dev.type == "cuda":
        sizes = {"bandwidth_mib": 256, "mm_n": 2048, "int8_n": 2048}

    kernels: dict[str, str] = {}
    bandwidth_gbs, kernels["bandwidth"] = measure_bandwidth_gbs(dev, sizes["bandwidth_mib"], inner=inner)
    measured: dict[str, float | None] = {}
    formats = ["fp32", "bf16", "int8"]
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9):
        formats.append("fp8")
    for fmt in formats:
        n = sizes["int8_n"] if fmt == "int8" else sizes["mm_n"]
        try:
            measured[fmt], kernels[fmt] = measure_matmul_flops(dev, fmt, n, inner=inner)
        except Exception as e:  # a format this build or device cannot run
            measured[fmt] = None
            notes.append(f"{fmt}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")

    peaks = dict(measured)
    if dev.type == "cpu" and measured.get("bf16") and measured.get("fp32") and measured["bf16"] < measured["fp32"]:
        # A bf16 path slower than fp32 is emulation; the engine would compute in fp32, so it is no peak.
        peaks["bf16"] = None
        notes.append(f"bf16: no fast path on this CPU (measured {measured['bf16'] / 1e9:.1f} GFLOP/s, below fp32's "
                     f"{measured['fp32'] / 1e9:.1f}); peak_flops.bf16 left null")
    if dev.type == "cpu":
        notes.append("CPU peaks use torch's threads as set now; other load on the machine lowers them")
    return {
        "name": name, "device": dev.type, "memory_bytes": memory_bytes,
        "peak_bandwidth_gbs": bandwidth_gbs, "peak_flops": peaks, "peak_source": "measured",
        "measured_flops": measured, "kernels": kernels, "notes": notes,
    }
