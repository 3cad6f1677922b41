"""Naive W8A8: int8 per-channel weights rounded to nearest, inputs quantized to int8 per token at run time, one
int8 GEMM (torch._int_mm, in `W8A8Linear`). No smoothing: the baseline SmoothQuant is measured against
(arXiv 2211.10438), and the vector-wise quantization of LLM.int8() without its outlier path (arXiv 2208.07339).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pernode.quant_format import W8A8_SCHEME, QuantScheme
from pernode.shrink.methods.modifier import Modifier
from pernode.shrink.methods.rtn import quantize_all_rtn


@dataclass(frozen=True)
class W8A8(Modifier):
    """Round-to-nearest int8 weights x dynamic per-token int8 activations; no options, no calibration."""

    name: ClassVar[str] = "w8a8"
    required_scheme: ClassVar[QuantScheme] = W8A8_SCHEME

    @torch.no_grad()
    def apply(self, model, scheme: QuantScheme = W8A8_SCHEME, calibration: torch.Tensor | None = None,
              quiet: bool = False) -> dict:
        quantize_all_rtn(model, scheme)
        return {}
