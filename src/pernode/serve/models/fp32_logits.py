"""The final RMSNorm and the lm_head of the sampled rows in fp32, whatever dtype the decoder runs in.

bf16 keeps 8 bits of mantissa: logits of ~20 are rounded to steps of 0.125, so two candidates a tenth of a nat apart
can tie exactly and greedy decoding takes the first index instead of the best token (SmolLM2 answers "What is the
capital of France?" with 'L' instead of 'The': -1.965 against -1.883 nats in fp32). Only the sampled rows reach
the lm_head (one per sequence in a step), so computing them in fp32 costs a few hundred kFLOP per row beyond bf16,
and for a quantized lm_head (GGUF Q8_0) nothing more than the GEMV already streams: it keeps float activations (on
AVX2, int16 per 32 values: the logits within ~2e-3 of fp32's on the default model, where int8 x moves them by ~0.09
and flips the near-tie above; on AVX-512 VNNI its GEMM for many rows takes int16 x too, csrc/gemm_int8_int16x_avx512.h).
Mixed precision's rule of an fp32 output layer (Micikevicius et al., "Mixed Precision Training", arXiv 1710.03740).
"""
from __future__ import annotations

import torch
from torch import nn

from pernode.serve.kernels.layer_ops import rms_norm
from pernode.serve.kernels.quant_linear import QuantLinear


def runs_in_fp32(lm_head: nn.Module) -> bool:
    """Whether this lm_head gives fp32 logits from fp32 rows without a float copy of its weight: quantized layers
    (their kernels take float x, int8 weights) and fp32 layers. A dense bf16 lm_head (a dequantized model in bf16)
    stays in bf16: an fp32 copy of a 49152 x 576 table would add 113 MB, and converting it per step costs more than
    the step's GEMMs."""
    weight = getattr(lm_head, "weight", None)
    return isinstance(lm_head, QuantLinear) or (weight is not None and weight.dtype == torch.float32)


def sampled_logits(norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [rows, vocab] of the sampled rows' last hidden states (`norm` is the model's final RMSNorm)."""
    if hidden.dtype == torch.float32 or not runs_in_fp32(lm_head):
        return lm_head(norm(hidden)).float()
    weight = norm.weight if norm.weight.dtype == torch.float32 else norm.weight.float()
    return lm_head(rms_norm(hidden.float(), weight, norm.eps, norm.native)).float()
