"""Round-to-nearest weight quantization: each group's min/max sets its scale, every weight rounds independently.

The baseline every other method is measured against (no paper; e.g. the RTN rows of arXiv 2210.17323).
"""
from __future__ import annotations

import torch

from pernode.shrink.methods.common import check_model, install, projections
from pernode.quant_format import QuantScheme, quantize_weight


@torch.no_grad()
def quantize_rtn(model, scheme: QuantScheme, **_) -> dict:
    """Quantize every decoder projection in place; returns a small report."""
    check_model(model, scheme)
    for i, layer in enumerate(model.layers):
        for parent, attr, linear in projections(layer):
            install(parent, attr, *quantize_weight(linear.weight.data, scheme), scheme, f"layers.{i}.{attr}")
    return {}
