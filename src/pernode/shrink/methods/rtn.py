"""Round-to-nearest weight quantization: each group's min/max sets its scale, every weight rounds independently.

The baseline every other method is measured against (no paper; e.g. the RTN rows of arXiv 2210.17323).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.shrink.methods.common import install, projections
from pernode.shrink.methods.modifier import Modifier


@dataclass(frozen=True)
class RTN(Modifier):
    """Round to nearest; no options, no calibration."""

    name: ClassVar[str] = "rtn"

    @torch.no_grad()
    def apply(self, model, scheme: QuantScheme, calibration: torch.Tensor | None = None, quiet: bool = False) -> dict:
        quantize_all_rtn(model, scheme)
        return {}


@torch.no_grad()
def quantize_all_rtn(model, scheme: QuantScheme) -> None:
    """Every decoder projection rounded to nearest under `scheme`, in place (W8A8 reuses it with its scheme)."""
    for i, layer in enumerate(model.layers):
        for parent, attr, linear in list(projections(layer)):
            install(parent, attr, *quantize_weight(linear.weight.data, scheme), scheme, f"layers.{i}.{attr}")
