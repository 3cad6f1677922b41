"""The EAGLE head's serving form on CPU: its five projections as int8 weight-only layers, and the FR-Spec token
subset as rows of the served (quantized) lm_head.

A draft step reads every weight of the head once for one row, like a decode step: bandwidth-bound. Timed alone
(benchmarks/eagle_step.py, 1 thread), the head's bf16 projections through aten ran at about 6 GB/s and a
49152-row Q8_0 lm_head was half the step; the engine's int8 GEMV reads the head in a quarter of the bytes, and an
8k-token subset of the lm_head's own int8 rows an eighth of them. Only the draft changes: verification scores every
proposal with the target's own kernels, so outputs stay exact.
"""
from __future__ import annotations

import torch
from torch import nn

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.serve.engine.spec_decode.eagle_head import LINEAR_NAMES, EagleHead, dense_weight
from pernode.serve.kernels.quant_linear import QuantLinear

HEAD_SCHEME = QuantScheme(num_bits=8, group_size=32, symmetric=True)


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
    """An int8 (symmetric, 32-value groups) weight-only layer holding `weight` [out, in], rounded to nearest."""
    out_features, in_features = weight.shape
    layer = QuantLinear(in_features, out_features, HEAD_SCHEME, bias=bias is not None, device=weight.device)
    q, scale, zero = quantize_weight(weight.detach().float(), HEAD_SCHEME)
    with torch.no_grad():
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
    layer.set_quantized(q, scale, zero)
    return layer


def lm_head_rows(lm_head: nn.Module, ids: torch.Tensor) -> nn.Module:
    """A layer computing the logits of the tokens `ids` only: the quantized lm_head's own rows (same integers, same
    scales) when it is a weight-only quantized layer, else its float rows as an int8 layer."""
    if isinstance(lm_head, QuantLinear) and not lm_head.scheme.activations:
        rows = QuantLinear(lm_head.in_features, len(ids), lm_head.scheme, device=ids.device)
        scale = lm_head.weight_scale[ids]
        zero = lm_head.weight_min if lm_head.weight_min is not None else lm_head.weight_zero_point
        with torch.no_grad():
            rows.qweight.copy_(lm_head.qweight[ids])
            rows.weight_scale.copy_(scale)
            if zero is not None:
                (rows.weight_min if rows.weight_min is not None else rows.weight_zero_point).copy_(zero[ids])
        rows.post_load()
        return rows
    return int8_linear(dense_weight(lm_head)[ids])


def install_int8_projections(head: EagleHead) -> None:
    """The head's five projections as int8 layers (its float weights stay, for saving and training)."""
    weights = {name: (head.fc.weight, head.fc.bias) if name == "fc" else (getattr(head, name), None)
               for name in LINEAR_NAMES}
    head.serving = {name: int8_linear(w, b) for name, (w, b) in weights.items()}
