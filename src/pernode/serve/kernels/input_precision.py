"""Which precision a quantized layer's x takes in each kernel, chosen per CPU: int8 per 32-value block for the int4
GEMV (VNNI's vpdpbusd, AVX2's vpmaddubsw), int16 per 32 values for int4 GEMMs on AVX2 (vpmaddwd), float elsewhere;
and the plain-torch model of the int8 rounding that the GEMV's reference applies (quantize_input_blocks)."""
from __future__ import annotations

import torch

from pernode import envs
from pernode.envs import GemmInput, QuantInput
from pernode.serve.kernels.cpu_features import has_vnni, multiplies_int16_gemm, multiplies_int8_natively
from pernode.serve.kernels.gemm_dispatch import NEVER

ACT_BLOCK = 32  # x values sharing one int8 (or int16) scale
# csrc/quant_linear.cpp kFloatGemvMaxRows: with float x the op runs its GEMV up to this many rows, a tiled fp32
# matmul beyond
FLOAT_GEMV_MAX_ROWS = 8


def quantize_input_blocks(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """x as the GEMV sees it: symmetric int8 per `block` values of a row (rint(x * 127/amax)), dequantized."""
    xb = x.float().reshape(*x.shape[:-1], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * (amax / 127.0)).reshape(x.shape)


def int8_input_max_rows(num_bits: int, in_features: int, group_size: int | None) -> int:
    """Up to how many rows a call's x is quantized to int8 before the int4 GEMV (0: never; NEVER: every call below
    the GEMM crossover). Integer products keep the int4 GEMV bandwidth-bound where unpack + convert + FMA would make
    it compute-bound (6 vs 9.5 GB/s with AVX-512 VNNI, 1 thread).
    - VNNI CPUs, or PERNODE_QUANT_INPUT=int8: every GEMV call.
    - AVX2 CPUs (vpmaddubsw): decode-sized calls only, the rows the float-x op would run as a GEMV too
      (FLOAT_GEMV_MAX_ROWS); beyond them x stays float, but for the fused stack's decode steps
      (QuantLinear.decode_int8_max_rows). Batch-1 TPOT is 15 ms against 17-20 with float x, but
      that GEMV beats the GEMM up to 30-40 rows, and prefilling a short chat prompt with int8 activations flips the
      default model's answer to the README's question (tests/test_int4_panel_gemm.py).
    - Elsewhere, and for int8 weights: never; int8 x would only be dequantized again. With AVX-512 their float-x
      GEMV already streams faster than memory; on AVX2 it takes x as int16 per 32 values (csrc/gemv_int8x_avx2.h),
      which is as fast as int8 x there and keeps the Q8_0 lm_head's near-tie first tokens as fp32 picks them."""
    setting = envs.quant_input()
    blocks_fit = in_features % ACT_BLOCK == 0 and (group_size or in_features) % ACT_BLOCK == 0
    if num_bits != 4 or setting is QuantInput.FLOAT or not blocks_fit:
        return 0
    if setting is QuantInput.INT8 or has_vnni():
        return NEVER
    return FLOAT_GEMV_MAX_ROWS if multiplies_int8_natively() else 0


def int16_gemm_applies(num_bits: int, in_features: int, group_size: int | None) -> bool:
    """Whether the layer's GEMM (prefill chunks, large decode batches) quantizes x to int16 per 32 values and
    multiplies the weights as integers: int4 layers on CPUs with AVX2 but not AVX-512 (csrc/gemm_int4_int16x_avx2.h),
    int8 layers (the Q8_0 lm_head) on AVX-512 VNNI (csrc/gemm_int8_int16x_avx512.h), where the blocks fit, unless
    PERNODE_GEMM_INPUT=float. Elsewhere the GEMM dequantises tiles and multiplies in x's dtype. int16 x errs by ~1e-5
    of each block's largest |x|: the fp32 GEMM's numbers to well within bf16's, where int8 x would flip the default
    model's near-tie chat answer."""
    blocks_fit = in_features % ACT_BLOCK == 0 and (group_size or in_features) % ACT_BLOCK == 0
    if not blocks_fit or envs.gemm_input() is GemmInput.FLOAT:
        return False
    return multiplies_int16_gemm(num_bits)
