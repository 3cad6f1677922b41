"""LLM.int8(): vector-wise int8 matmul (per-token activations x per-channel weights) with mixed-precision
decomposition: input columns holding an outlier (|x| >= 6.0) are multiplied in float (arXiv 2208.07339).

Weights are stored int8 once; the float path multiplies the outlier columns by those weight columns dequantized.
Calibration text is run through the quantized model to report outlier columns per layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from pernode.quant_format import W8A8_SCHEME, QuantScheme
from pernode.serve.kernels.w8a8_linear import W8A8Linear
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.shrink.methods.modifier import Modifier, require
from pernode.shrink.methods.rtn import quantize_all_rtn

DEFAULT_THRESHOLD = 6.0


@dataclass(frozen=True)
class LLMInt8(Modifier):
    """LLM.int8()'s option: the |x| from which an input column runs in float."""

    name: ClassVar[str] = "llm-int8"
    needs_calibration: ClassVar[bool] = True  # only to report outlier columns; the weights do not depend on it
    required_scheme: ClassVar[QuantScheme] = W8A8_SCHEME

    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        number = isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
        require(number and self.threshold > 0, "threshold", self.threshold, "> 0 (the paper's is 6.0)")

    @torch.no_grad()
    def apply(self, model, scheme: QuantScheme = W8A8_SCHEME, calibration: torch.Tensor | None = None,
              quiet: bool = False) -> dict:
        """Quantize every decoder projection in place; returns per-layer outlier statistics on the calibration
        text."""
        quantize_all_rtn(model, dataclasses.replace(scheme, outlier_threshold=self.threshold))
        return {"threshold": self.threshold, "outliers": outlier_stats(model, calibration)}


def outlier_stats(model, calibration: torch.Tensor | None) -> dict:
    """Per W8A8Linear: mean and max outlier input columns per forward of one calibration window."""
    stats = {}
    if calibration is None:
        return stats
    for window in calibration:  # one window per call: counts are per forward of one sequence
        final_hidden_states(model, window[None])
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear) and m.num_calls:
            stats[name] = {"mean_outlier_columns": m.num_outlier_columns / m.num_calls,
                           "max_outlier_columns": m.max_outlier_columns, "in_features": m.in_features}
            m.num_calls = m.num_outlier_columns = m.max_outlier_columns = 0
    return stats
