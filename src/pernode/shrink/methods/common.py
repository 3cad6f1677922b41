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


# A pruner marks each Linear it pruned with its keep-mask (bool [out, in]) under this attribute, so that a quantizer
# run afterwards keeps the zeros: GPTQ treats them as known errors, every method stores them as exact zeros.
PRUNED_MASK = "pruned_mask"


def pruned_mask(linear: nn.Module) -> torch.Tensor | None:
    """The keep-mask a pruner left on `linear`, or None when it was not pruned."""
    return getattr(linear, PRUNED_MASK, None)


def set_pruned_mask(linear: nn.Module, keep: torch.Tensor) -> None:
    setattr(linear, PRUNED_MASK, keep)


def zero_at_pruned(q: torch.Tensor, zero: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """q with pruned entries set to the value that dequantizes to exactly 0 (the group's zero point, or 0)."""
    if zero is None:
        return torch.where(keep, q, torch.zeros_like(q))
    per_column = zero.to(q.dtype).repeat_interleave(q.shape[1] // zero.shape[1], dim=1)
    return torch.where(keep, q, per_column)


@torch.no_grad()
def install(parent: nn.Module, attr: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            scheme: QuantScheme, name: str = "linear") -> nn.Module:
    """Replace parent.attr (a float Linear) by a quantized layer holding q/scale/zero (and its bias)."""
    linear = getattr(parent, attr)
    keep = pruned_mask(linear)
    if keep is not None:
        q = zero_at_pruned(q, zero, keep)
    module = make_quantized_linear(linear, scheme, name)
    module.set_quantized(q, scale, zero)
    if linear.bias is not None:
        module.bias.data.copy_(linear.bias.data)
    setattr(parent, attr, module)
    return module
