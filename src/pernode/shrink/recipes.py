"""Recipes: what is done to a model to shrink it (a method with its options, the scheme of the decoder's weights,
and whether the lm_head is quantized too), as one object that the report, the benchmark and a checkpoint's config
name the same way. The configurations we measure are a table of them, keyed by their names."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pernode.quant_format import W8A8_SCHEME, QuantScheme
from pernode.shrink.methods import (AWQ, GPTQ, RTN, W8A8, LLMInt8, Modifier, SmoothQuant, modifier_from_dict,
                                    quantize_model)
from pernode.shrink.methods.common import check_model
from pernode.shrink.methods.lm_head import LM_HEAD_SCHEME, quantize_lm_head
from pernode.shrink.pruning import Magnitude, Pruner, SparseGPT, Wanda, pruner_from_dict


@dataclass(frozen=True)
class Recipe:
    """`pruner` first (None: dense), then `modifier` under `scheme`, then the lm_head under `lm_head` (None: it
    stays float). No modifier and no scheme: float weights (the baseline the others are measured against, or
    pruned only). A SparseGPT/Wanda/magnitude pruner followed by GPTQ runs as one pass: each layer is pruned and its
    survivors quantized on the same Hessian before the next layer calibrates (SparseGPT's joint mode)."""

    name: str
    scheme: QuantScheme | None = None
    modifier: Modifier | None = None
    lm_head: QuantScheme | None = None
    pruner: Pruner | None = None

    def __post_init__(self) -> None:
        if (self.scheme is None) != (self.modifier is None):
            raise ValueError(f"recipe {self.name!r}: scheme={self.scheme and self.scheme.label()} with "
                             f"modifier={self.modifier}: allowed both (a quantized model) or neither (float)")
        if self.lm_head is not None and self.modifier is None:
            raise ValueError(f"recipe {self.name!r}: lm_head={self.lm_head.label()} needs a method for the decoder")
        if self.modifier is not None:
            self.modifier.check_scheme(self.scheme)

    @property
    def is_float(self) -> bool:
        return self.modifier is None

    @property
    def method(self) -> str:
        quantizer = None if self.modifier is None else self.modifier.name
        pruner = None if self.pruner is None else self.pruner.name
        return "+".join(m for m in (pruner, quantizer) if m) or "fp32"

    @property
    def needs_calibration(self) -> bool:
        return ((self.modifier is not None and self.modifier.needs_calibration)
                or (self.pruner is not None and self.pruner.needs_calibration))

    @property
    def label(self) -> str:
        """What the weights become, for tables: `w4-g64 + lm_head w8-g32`, `w8a8-ch`, `fp32`."""
        sparse = "" if self.pruner is None else f"sparse {self.pruner.label()}"
        if self.scheme is None:
            return sparse or "fp32"
        quant = self.scheme.label() + (f" + lm_head {self.lm_head.label()}" if self.lm_head else "")
        return f"{sparse} {quant}" if sparse else quant

    def apply(self, model, calibration: torch.Tensor | None = None, quiet: bool = False) -> dict:
        """Prune and/or quantize `model` in place; returns the methods' report ({} for the float recipe)."""
        pruned = {}
        if self.pruner is not None:
            joint = (self.modifier, self.scheme) if isinstance(self.modifier, GPTQ) else None
            if joint:  # fail before any work, as quantize_model does
                check_model(model, self.scheme)
            pruned = {"pruning": self.pruner.apply(model, calibration, quiet, then_gptq=joint)}
            if joint:
                if self.lm_head is not None:
                    quantize_lm_head(model, self.lm_head)
                return pruned
        if self.modifier is None:
            return pruned
        report = {**quantize_model(model, self.modifier, self.scheme, calibration, quiet), **pruned}
        if self.lm_head is not None:
            quantize_lm_head(model, self.lm_head)
        return report

    def to_dict(self) -> dict:
        return {"name": self.name, "scheme": _dict_or_none(self.scheme), "modifier": _dict_or_none(self.modifier),
                "lm_head": _dict_or_none(self.lm_head), "pruner": _dict_or_none(self.pruner)}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        return cls(name=d["name"],
                   scheme=None if d.get("scheme") is None else QuantScheme.from_dict(d["scheme"]),
                   modifier=None if d.get("modifier") is None else modifier_from_dict(d["modifier"]),
                   lm_head=None if d.get("lm_head") is None else QuantScheme.from_dict(d["lm_head"]),
                   pruner=None if d.get("pruner") is None else pruner_from_dict(d["pruner"]))


def _dict_or_none(obj) -> dict | None:
    return None if obj is None else obj.to_dict()


# The configurations `pernode report` and benchmarks/quantization.py measure; "+lm8": the lm_head int8 g32 too
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp32"),
    Recipe("rtn-int8", QuantScheme(8), RTN()),
    Recipe("rtn-int8+lm8", QuantScheme(8), RTN(), LM_HEAD_SCHEME),
    Recipe("rtn-int4-g64", QuantScheme(4, 64), RTN()),
    Recipe("rtn-int4-g64+lm8", QuantScheme(4, 64), RTN(), LM_HEAD_SCHEME),
    Recipe("rtn-int4-g32", QuantScheme(4, 32), RTN()),
    Recipe("gptq-int4-g64", QuantScheme(4, 64), GPTQ()),
    Recipe("gptq-int4-g64+lm8", QuantScheme(4, 64), GPTQ(), LM_HEAD_SCHEME),
    Recipe("awq-int4-g64", QuantScheme(4, 64), AWQ()),
    Recipe("awq-int4-g64+lm8", QuantScheme(4, 64), AWQ(), LM_HEAD_SCHEME),
    Recipe("w8a8", W8A8_SCHEME, W8A8()),
    Recipe("smoothquant-w8a8", W8A8_SCHEME, SmoothQuant()),
    Recipe("smoothquant-w8a8-auto", W8A8_SCHEME, SmoothQuant(alpha="auto")),
    Recipe("llm-int8", W8A8_SCHEME, LLMInt8()),
)}


# The pruned configurations (float weights in sparse checkpoints, or pruned then quantized), measured beside them
PRUNED_RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("magnitude-50", pruner=Magnitude(0.5)),
    Recipe("wanda-50", pruner=Wanda(0.5)),
    Recipe("wanda-50-owl", pruner=Wanda(0.5, layerwise="owl")),
    Recipe("sparsegpt-50", pruner=SparseGPT(0.5)),
    Recipe("sparsegpt-50-owl", pruner=SparseGPT(0.5, layerwise="owl")),
    Recipe("magnitude-2:4", pruner=Magnitude(0.5, "2:4")),
    Recipe("wanda-2:4", pruner=Wanda(0.5, "2:4")),
    Recipe("sparsegpt-2:4", pruner=SparseGPT(0.5, "2:4")),
    Recipe("sparsegpt-4:8", pruner=SparseGPT(0.5, "4:8")),
    Recipe("sparsegpt-70", pruner=SparseGPT(0.7)),
    Recipe("sparsegpt-50+gptq-int4-g64", QuantScheme(4, 64), GPTQ(), pruner=SparseGPT(0.5)),
    Recipe("sparsegpt-50-owl+gptq-int4-g64", QuantScheme(4, 64), GPTQ(), pruner=SparseGPT(0.5, layerwise="owl")),
    Recipe("wanda-50+rtn-int4-g64", QuantScheme(4, 64), RTN(), pruner=Wanda(0.5)),
)}


def recipes_named(names: list[str]) -> list[Recipe]:
    """The known recipes of these names, in order; ValueError listing the known names for any other."""
    known = {**RECIPES, **PRUNED_RECIPES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}: allowed {', '.join(known)}")
    return [known[n] for n in names]
