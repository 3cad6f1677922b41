"""Shrink a model: quantization methods that rewrite its projections, recipes that combine them, and the
checkpoints they write.

A method is an object with its own validated options (`GPTQ(damp_ratio=0.01)`, `SmoothQuant(alpha="auto")`);
`quantize_model(model, modifier, scheme, calibration)` runs it; a `Recipe` adds the scheme and the lm_head step,
and `RECIPES` names the configurations we measure.
"""
from __future__ import annotations

from pernode.shrink.methods import (AWQ, GPTQ, METHODS, RTN, W8A8, LLMInt8, Modifier, SmoothQuant, method_named,
                                    quantize_model)
from pernode.shrink.recipes import RECIPES, Recipe, recipes_named

__all__ = ["AWQ", "GPTQ", "LLMInt8", "METHODS", "Modifier", "RECIPES", "RTN", "Recipe", "SmoothQuant", "W8A8",
           "method_named", "quantize_model", "recipes_named"]
