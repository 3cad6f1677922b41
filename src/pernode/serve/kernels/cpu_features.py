"""What this CPU computes natively, detected at run time (never assumed from the build machine): the engine's
default dtype follows it, as vLLM's CPU backend does (bf16 where AVX512_BF16 or AMX run it, fp32 elsewhere)."""
from __future__ import annotations

import functools
from pathlib import Path

# /proc/cpuinfo flags (x86) or Features (aarch64) that mean hardware bf16 dot products
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where it cannot be read (non-Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16_flags() -> list[str]:
    """The flags by which this CPU computes bf16 natively (empty: it does not, or we cannot tell)."""
    return [flag for flag in BF16_FLAGS if flag in cpu_flags()]


def computes_bf16_natively() -> bool:
    return bool(native_bf16_flags())


# What the int4 GEMV multiplies int8 x with, the kernels being built with -march=native: AVX-512 VNNI
# (csrc/quant_linear.h PERNODE_VNNI), or, on a CPU without AVX-512, AVX2's vpmaddubsw (csrc/gemv_int8x_avx2.h)
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
AVX2_INT8_FLAGS = ("avx2", "fma", "f16c")


def has_vnni() -> bool:
    return all(flag in cpu_flags() for flag in VNNI_FLAGS)


def multiplies_int8_natively() -> bool:
    """Whether the int4 GEMV has an integer path for int8 x here. Without one (AVX-512 without VNNI, or neither
    AVX-512 nor AVX2), int8 x would be dequantized again and run as floats."""
    return has_vnni() or ("avx512f" not in cpu_flags() and all(flag in cpu_flags() for flag in AVX2_INT8_FLAGS))


def multiplies_int16_gemm(num_bits: int = 4) -> bool:
    """Whether GEMMs over `num_bits` weights have an integer path for int16 x here: int4 on AVX2 without AVX-512
    (csrc/gemm_int4_int16x_avx2.h, vpmaddwd), int8 on AVX-512 VNNI (csrc/gemm_int8_int16x_avx512.h, vpdpwssd).
    Elsewhere GEMMs dequantise tiles, in bf16 where the CPU computes it natively."""
    if num_bits == 8:
        return has_vnni()
    return num_bits == 4 and "avx512f" not in cpu_flags() and all(flag in cpu_flags() for flag in AVX2_INT8_FLAGS)
