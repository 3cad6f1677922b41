"""The pruning configurations we measure, by name, as `Recipe`s: pruned only (float weights, sparse checkpoints)
and pruned then quantized (SparseGPT + GPTQ int4 g64 in one pass)."""
from __future__ import annotations

from pernode.quant_format import QuantScheme
from pernode.shrink.methods import GPTQ, RTN
from pernode.shrink.pruning import Magnitude, SparseGPT, Wanda
from pernode.shrink.recipes import Recipe

PRUNING_RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp32"),
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
