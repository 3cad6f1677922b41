"""Shrink a model: quantization methods that rewrite its projections, and the checkpoints they write.

`quantize_model(model, method, scheme, calibration)` dispatches to one method; `METHODS` lists them.
"""
from __future__ import annotations

import importlib

import torch

from pernode.compress.scheme import QuantScheme

# method -> (module, function, needs calibration text, scheme constraints)
METHODS = {
    "rtn": ("pernode.compress.rtn", "quantize_rtn"),
    "gptq": ("pernode.compress.gptq", "quantize_gptq"),
    "awq": ("pernode.compress.awq", "quantize_awq"),
    "smoothquant": ("pernode.compress.smoothquant", "quantize_smoothquant"),
    "w8a8": ("pernode.compress.smoothquant", "quantize_w8a8"),
    "llm-int8": ("pernode.compress.llm_int8", "quantize_llm_int8"),
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
