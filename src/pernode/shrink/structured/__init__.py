"""Structured pruning: whole attention heads (or KV groups), FFN channels and decoder layers removed, ranked by
activation importance on calibration text (Minitron), leaving a smaller dense model the engine serves as is."""
from __future__ import annotations

from pernode.shrink.structured.importance import ActivationImportance, measure_importance
from pernode.shrink.structured.plan import PruningPlan
from pernode.shrink.structured.prune import prune_model, select_layers

__all__ = ["ActivationImportance", "PruningPlan", "measure_importance", "prune_model", "select_layers"]
