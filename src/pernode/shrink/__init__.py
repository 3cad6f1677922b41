"""Shrink a model: quantization methods that rewrite its projections, and the checkpoints they write.

`quantize_model(model, method, scheme, calibration)` dispatches to one method; `METHODS` lists them.
"""
from __future__ import annotations

import importlib

import torch

from pernode.quant_format import QuantScheme

# method -> (module, function, needs calibration text, scheme constraints)
METHODS = {
    "rtn": ("pernode.shrink.methods.rtn", "quantize_rtn"),
    "gptq": ("pernode.shrink.methods.gptq", "quantize_gptq"),
    "awq": ("pernode.shrink.methods.awq", "quantize_awq"),
    "smoothquant": ("pernode.shrink.methods.smoothquant", "quantize_smoothquant"),
    "w8a8": ("pernode.shrink.methods.smoothquant", "quantize_w8a8"),
    "llm-int8": ("pernode.shrink.methods.llm_int8", "quantize_llm_int8"),
}
CALIBRATED = {"gptq", "awq", "smoothquant", "llm-int8"}


def quantize_model(model, method: str, scheme: QuantScheme, calibration: torch.Tensor | None = None,
                   **options) -> dict:
    """Quantize `model` in place with `method`; returns the method's report (e.g. LLM.int8() outlier counts)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown: allowed {', '.join(METHODS)}")
    if method in CALIBRATED and calibration is None:
        raise ValueError(f"method {method!r} needs calibration windows (token ids [S, L])")
    module, fn = METHODS[method]
    return getattr(importlib.import_module(module), fn)(model, scheme, calibration=calibration, **options)
