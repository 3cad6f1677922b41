"""Random int4 QuantLinear layers in every int4 qparam form, for the kernel tests (panel, int16-x GEMM)."""
from __future__ import annotations

import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.serve.kernels.quant_linear import QuantLinear

SCHEMES = {
    "q4_1": QuantScheme(4, 32, symmetric=False, float_min=True),  # GGUF Q4_1: a float min per group
    "sym-g128": QuantScheme(4, 128),  # no zero term: the int4 offset alone
    "zp-g64": QuantScheme(4, 64, symmetric=False),  # integer zero point
    "per-channel": QuantScheme(4, None),
}


def int4_layer(scheme: QuantScheme, in_features: int, out_features: int, seed: int = 0) -> QuantLinear:
    """A layer of random weights; GGUF-like (float min) qparams exact in fp16, as GGUF's are."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLinear(in_features, out_features, scheme)
    w = torch.randn(out_features, in_features, generator=gen)
    if scheme.float_min:
        q, scale, _ = quantize_weight(w, QuantScheme(4, scheme.group_size, symmetric=False))
        mins = (torch.randn(out_features, scale.shape[1], generator=gen) * 0.05).half().float()
        layer.set_quantized(q, scale.half().float(), mins)
    else:
        layer.set_quantized(*quantize_weight(w, scheme))
    return layer
