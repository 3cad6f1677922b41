"""The student, built from the teacher: chosen teacher layers copied (DistilBERT, Sanh et al. 2019, arXiv 1910.01108;
Minitron's depth pruning) and, optionally, narrowed by structured pruning (fewer heads / KV groups / FFN channels,
ranked by activation importance). Same tokenizer, same embedding and lm_head."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pernode.shrink.structured.importance import measure_importance
from pernode.shrink.structured.plan import PruningPlan
from pernode.shrink.structured.prune import evenly_spaced_layers, prune_model


@dataclass(frozen=True)
class StudentSpec:
    """Which teacher layers the student keeps and how narrow it is.

    layers: explicit teacher layer indices; else keep_layers picked evenly (layer_choice "even") or by block
    importance ("importance"); width: heads / kv_heads / ffn of a PruningPlan (its `layers` must be None)."""

    layers: tuple[int, ...] | None = None
    keep_layers: int | None = None
    layer_choice: str = "even"
    width: PruningPlan = PruningPlan()
    refit_windows: int = 0  # calibration windows for the least-squares refit of o_proj/down_proj after narrowing

    def __post_init__(self) -> None:
        if self.layer_choice not in ("even", "importance"):
            raise ValueError(f"layer_choice={self.layer_choice!r} is not supported: allowed even, importance")
        if self.layers is not None and self.keep_layers is not None:
            raise ValueError("layers and keep_layers are alternatives: give one")
        if self.width.layers is not None:
            raise ValueError("width: give the layer count as keep_layers, not as width's layers")
        if self.refit_windows < 0 or (self.refit_windows and self.width.is_identity):
            raise ValueError(f"refit_windows={self.refit_windows}: allowed 0, or >= 1 with a width to prune")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["width"] = self.width.to_dict()
        return d

    @property
    def needs_importance(self) -> bool:
        return not self.width.is_identity or (self.keep_layers is not None and self.layer_choice == "importance")


def build_student(teacher, spec: StudentSpec, calibration: torch.Tensor | None = None):
    """(student, kept teacher layer indices). `calibration` windows rank heads/channels/layers when needed."""
    n = teacher.config.num_hidden_layers
    importance = None
    if spec.needs_importance:
        if calibration is None:
            raise ValueError("calibration windows are required to rank heads, channels or layers by importance")
        importance = measure_importance(teacher, calibration)
    if spec.layers is not None:
        layers = list(spec.layers)
        bad = [i for i in layers if not 0 <= i < n]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers={','.join(map(str, layers))} is not allowed: distinct indices in 0..{n - 1}")
    elif spec.keep_layers is not None and spec.layer_choice == "even":
        layers = evenly_spaced_layers(n, spec.keep_layers)
    elif spec.keep_layers is not None:
        if not 1 <= spec.keep_layers <= n:
            raise ValueError(f"keep_layers={spec.keep_layers} is out of range: allowed 1..{n}")
        order = sorted(range(n), key=lambda i: (-float(importance.layers[i]), i))
        layers = sorted(order[:spec.keep_layers])
    else:
        layers = list(range(n))
    plan = dataclasses.replace(spec.width, layers=len(layers))
    refit = calibration[:spec.refit_windows] if spec.refit_windows else None
    return prune_model(teacher, plan, importance, layer_indices=layers, refit_windows=refit), layers
