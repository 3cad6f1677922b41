"""Shared plumbing of the quantization methods: which layers, swapping a float Linear for its quantized twin."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pernode.quant_format import QuantScheme
from pernode.serve.kernels.quant_linear import QUANTIZED_LINEARS, make_quantized_linear


def projections(layer) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of a decoder layer's float projections, in forward order."""
    for parent in (layer.self_attn, layer.mlp):
        for attr in QUANTIZED_LINEARS:
            linear = getattr(parent, attr, None)
            if isinstance(linear, nn.Linear):
                yield parent, attr, linear


def check_model(model, scheme: QuantScheme) -> None:
    """Fail before any work when a layer's shape does not fit the scheme (e.g. group size vs input size)."""
    for i, layer in enumerate(model.layers):
        for _, attr, linear in projections(layer):
            scheme.check_shape(f"layers.{i}.{attr}", linear.in_features)


@torch.no_grad()
def install(parent: nn.Module, attr: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            scheme: QuantScheme, name: str = "linear") -> nn.Module:
    """Replace parent.attr (a float Linear) by a quantized layer holding q/scale/zero (and its bias)."""
    linear = getattr(parent, attr)
    module = make_quantized_linear(linear, scheme, name)
    module.set_quantized(q, scale, zero)
    if linear.bias is not None:
        module.bias.data.copy_(linear.bias.data)
    setattr(parent, attr, module)
    return module
