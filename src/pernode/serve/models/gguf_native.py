"""GGUF quantized blocks repacked, bit for bit, into pernode's int4/int8 weight layouts, so a GGUF is served at its
own precision by the kernels in serve/kernels/quant_linear.py instead of being dequantized at load.

Block formats are llama.cpp's (ggml-quants.c; k-quants: llama.cpp PR #1684). Each maps to a QuantScheme whose
dequantize reproduces gguf's own dequantize exactly (tests/test_gguf_native.py holds it to that):

  Q8_0  32 x int8, fp16 d                   w = d * q                 int8, symmetric, group 32
  Q4_0  32 x 4 bit, fp16 d                  w = d * (u - 8)           int4, symmetric, group 32
  Q4_1  32 x 4 bit, fp16 d and m            w = d * u + m             int4, float min, group 32
  Q4_K  256 x 4 bit in 8 groups of 32,      w = (d*sc) * u - dmin*mn  int4, float min, group 32
        6-bit sc/mn per group, fp16 d/dmin

Other types (Q6_K, Q5_*, ...) have no matching kernel layout and are dequantized to the serving dtype.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import ReaderTensor

from pernode.quant_format import QuantScheme

NATIVE_SCHEMES: dict[GGMLType, QuantScheme] = {
    GGMLType.Q8_0: QuantScheme(num_bits=8, group_size=32),
    GGMLType.Q4_0: QuantScheme(num_bits=4, group_size=32),
    GGMLType.Q4_1: QuantScheme(num_bits=4, group_size=32, symmetric=False, float_min=True),
    GGMLType.Q4_K: QuantScheme(num_bits=4, group_size=32, symmetric=False, float_min=True),
}
_BLOCK_VALUES = {GGMLType.Q8_0: 32, GGMLType.Q4_0: 32, GGMLType.Q4_1: 32, GGMLType.Q4_K: 256}
_BLOCK_BYTES = {GGMLType.Q8_0: 34, GGMLType.Q4_0: 18, GGMLType.Q4_1: 20, GGMLType.Q4_K: 144}


def native_scheme(tensor: ReaderTensor) -> QuantScheme | None:
    """The scheme a 2-D GGUF weight is served in, or None when it has no native form (it is dequantized)."""
    qtype = GGMLType(tensor.tensor_type)
    if qtype not in NATIVE_SCHEMES or len(tensor.shape) != 2:
        return None
    return NATIVE_SCHEMES[qtype]


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values [N, K] (uint8) -> int32 [N, K/8]: value k at bits 4*(k%8) of word k//8, the layout of
    quant_format.pack_int4 (which stores q + 8, i.e. exactly these unsigned values)."""
    n, k = u.shape
    words = u.reshape(n, k // 8, 8).astype(np.uint32) << (np.arange(8, dtype=np.uint32) * 4)
    return np.bitwise_or.reduce(words, axis=-1).view(np.int32)


def _split_low_high(qs: np.ndarray) -> np.ndarray:
    """[..., B] bytes -> [..., 2B] values: the B low nibbles, then the B high nibbles (ggml's order in a block)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of each Q4_K super-block from its 12 packed bytes (get_scale_min_k4)."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def repack(tensor: ReaderTensor) -> dict[str, np.ndarray]:
    """A native GGUF weight as compressed-tensors-style pieces in numpy/PyTorch order ([out, ...]):
    `weight` (int8 [N, K]) or `weight_packed` (int32 [N, K/8]), `weight_scale` (fp32 [N, K/32]) and, for the
    float-min form, `weight_min` (fp32 [N, K/32])."""
    qtype = GGMLType(tensor.tensor_type)
    if native_scheme(tensor) is None:
        raise ValueError(f"GGUF tensor {tensor.name!r} ({qtype.name}, {len(tensor.shape)}-D) has no native layout: "
                         f"allowed 2-D {', '.join(t.name for t in NATIVE_SCHEMES)}")
    k, n = (int(d) for d in tensor.shape)  # GGUF lists the innermost dimension first
    if k % _BLOCK_VALUES[qtype]:
        raise ValueError(f"GGUF tensor {tensor.name!r}: row length {k} is not a multiple of {qtype.name}'s block "
                         f"of {_BLOCK_VALUES[qtype]}")
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // _BLOCK_VALUES[qtype], _BLOCK_BYTES[qtype])
    if qtype is GGMLType.Q8_0:
        return {"weight": np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k),
                "weight_scale": _f16(blocks[..., :2]).reshape(n, -1)}
    if qtype is GGMLType.Q4_K:
        nb = blocks.shape[1]
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # [n, nb, 1]
        sc, mn = _q4_k_scales_mins(blocks[..., 4:16].reshape(-1, 12))
        # each 32-byte chunk holds two groups: its low nibbles, then its high nibbles
        u = _split_low_high(blocks[..., 16:].reshape(n, nb, 4, 32)).reshape(n, k)
        scale = (d * sc.reshape(n, nb, 8)).reshape(n, -1)
        minimum = -(dmin * mn.reshape(n, nb, 8)).reshape(n, -1)
        return {"weight_packed": pack_nibbles(u), "weight_scale": scale, "weight_min": minimum}
    offset = 4 if qtype is GGMLType.Q4_1 else 2
    u = _split_low_high(blocks[..., offset:]).reshape(n, k)
    pieces = {"weight_packed": pack_nibbles(u), "weight_scale": _f16(blocks[..., 0:2]).reshape(n, -1)}
    if qtype is GGMLType.Q4_1:
        pieces["weight_min"] = _f16(blocks[..., 2:4]).reshape(n, -1)
    return pieces
