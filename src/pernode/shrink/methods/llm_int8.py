"""LLM.int8(): vector-wise int8 matmul (per-token activations x per-channel weights) with mixed-precision
decomposition: input columns holding an outlier (|x| >= 6.0) are multiplied in float (arXiv 2208.07339).

Weights are stored int8 once; the float path multiplies the outlier columns by those weight columns dequantized.
Calibration text is run through the quantized model to report outlier columns per layer.
"""
from __future__ import annotations

import dataclasses

import torch

from pernode.quant_format import QuantScheme
from pernode.shrink.methods.smoothquant import W8A8, _w8a8_scheme, quantize_w8a8
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.serve.kernels.quant_linear import W8A8Linear

DEFAULT_THRESHOLD = 6.0


def quantize_llm_int8(model, scheme: QuantScheme = W8A8, calibration: torch.Tensor | None = None,
                      threshold: float = DEFAULT_THRESHOLD, **_) -> dict:
    """Quantize every decoder projection in place; returns per-layer outlier statistics on the calibration text."""
    scheme = dataclasses.replace(_w8a8_scheme(scheme), outlier_threshold=threshold)
    quantize_w8a8(model, scheme)
    stats = {}
    if calibration is not None:
        for window in calibration:  # one window per call: counts are per forward of one sequence
            final_hidden_states(model, window[None])
        for name, m in model.named_modules():
            if isinstance(m, W8A8Linear) and m.num_calls:
                stats[name] = {"mean_outlier_columns": m.num_outlier_columns / m.num_calls,
                               "max_outlier_columns": m.max_outlier_columns, "in_features": m.in_features}
                m.num_calls = m.num_outlier_columns = m.max_outlier_columns = 0
    return {"threshold": threshold, "outliers": stats}
