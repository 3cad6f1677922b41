"""What every pruning method is: a frozen dataclass of its own options (target sparsity, pattern, per-layer
allocation), validated on construction, that zeroes a model's decoder projections in place, layer by layer, each
layer calibrated on the outputs of the already-pruned layers before it (`shrink/calibration.py`, as GPTQ)."""
from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

import torch

from pernode.quant_format import QuantScheme
from pernode.shrink.calibration import run_sequential
from pernode.shrink.methods.common import projections, set_pruned_mask
from pernode.shrink.methods.gptq import CALIBRATION_CHUNK_WINDOWS, GPTQ, install_staged, layer_hessians
from pernode.shrink.methods.modifier import require
from pernode.shrink.pruning.dense_target import cross_statistics, refit_to_dense_target
from pernode.shrink.pruning.owl import outlier_ratio, owl_sparsities
from pernode.shrink.structured.importance import measure_importance
from pernode.sparse_format import SparsityPattern

OWL_CALIBRATION_WINDOWS = 8  # OWL only ranks layers: a few windows rank them as well as all of them


class Layerwise(str, enum.Enum):
    """How the target sparsity is spread over the decoder layers."""

    UNIFORM = "uniform"  # every layer at the target
    OWL = "owl"  # by outlier ratio, mean kept at the target (arXiv 2310.05175)
    SENSITIVITY = "sensitivity"  # by block importance 1 - cos(in, out) on calibration text, mean kept at the target


class Statistics(enum.Enum):
    """What a method needs from a layer's calibration inputs."""

    NONE = "none"  # magnitude
    DIAGONAL = "diagonal"  # ||X|| per input column (Wanda)
    HESSIAN = "hessian"  # X^T X (SparseGPT)


@dataclasses.dataclass(frozen=True)
class Pruner:
    """Base of the pruning methods. A subclass sets `name` and `statistics` and implements `prune_weight`."""

    name: ClassVar[str]
    statistics: ClassVar[Statistics] = Statistics.NONE

    sparsity: float = 0.5
    pattern: str = "unstructured"
    layerwise: Layerwise = Layerwise.UNIFORM
    owl_threshold: float = 5.0
    owl_spread: float = 0.08
    target: str = "pruned"  # each layer fitted to its own output on the pruned inputs, or to the dense model's

    def __post_init__(self) -> None:
        require(isinstance(self.sparsity, (int, float)) and 0 < self.sparsity < 1, "sparsity", self.sparsity,
                "0 < sparsity < 1 (the fraction of each projection's weights set to zero)")
        pattern = SparsityPattern.parse(self.pattern)
        object.__setattr__(self, "pattern", pattern.label())
        if pattern.is_structured:
            require(abs(pattern.sparsity - self.sparsity) < 1e-9, "sparsity", self.sparsity,
                    f"{pattern.sparsity:g} with pattern {pattern.label()} (N:M fixes the sparsity at 1 - N/M)")
        require(self.layerwise in [m.value for m in Layerwise], "layerwise", self.layerwise,
                ", ".join(m.value for m in Layerwise))
        object.__setattr__(self, "layerwise", Layerwise(self.layerwise))
        if pattern.is_structured:
            require(self.layerwise is Layerwise.UNIFORM, "layerwise", self.layerwise.value,
                    f"uniform with pattern {pattern.label()} (N:M sets every layer's sparsity)")
        require(self.target in ("pruned", "dense"), "target", self.target,
                "pruned (fit each layer's own output on the pruned model's inputs) or dense (fit the dense model's "
                "output: shrink/pruning/dense_target.py)")
        require(isinstance(self.owl_threshold, (int, float)) and self.owl_threshold > 1, "owl_threshold",
                self.owl_threshold, "> 1 (an outlier scores this many times its layer's mean)")
        if self.layerwise is not Layerwise.UNIFORM:
            room = min(self.sparsity, 1 - self.sparsity)
            require(isinstance(self.owl_spread, (int, float)) and 0 <= self.owl_spread < room, "owl_spread",
                    self.owl_spread, f"0 <= owl_spread < {room:g} (layers' sparsities stay within target +- spread)")

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        return (self.statistics is not Statistics.NONE or self.layerwise is not Layerwise.UNIFORM
                or self.target == "dense")

    def label(self) -> str:
        """`50% unstructured (owl)`, `2:4`."""
        target = " dense-target" if self.target == "dense" else ""
        if self.sparsity_pattern.is_structured:
            return self.pattern + target
        layerwise = "" if self.layerwise is Layerwise.UNIFORM else f" {self.layerwise.value}"
        return f"{self.sparsity:.0%}{layerwise}{target}"

    def prune_weight(self, weight: torch.Tensor, stats: torch.Tensor | None, sparsity: float, name: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned weight, keep-mask) of one projection at `sparsity`; `stats` as `statistics` says."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.name, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @torch.no_grad()
    def apply(self, model, calibration: torch.Tensor | None = None, quiet: bool = False,
              then_gptq: tuple[GPTQ, QuantScheme] | None = None) -> dict:
        """Prune `model`'s decoder projections in place, marking each with its keep-mask; with `then_gptq`, GPTQ
        each pruned projection right away on the same Hessian (SparseGPT's joint sparsify-and-quantize pass)."""
        if self.needs_calibration or then_gptq:
            require(calibration is not None, "calibration", None, f"token windows [S, L] (method {self.name} "
                    f"{'with GPTQ ' if then_gptq else ''}calibrates on text)")
        sparsities = self.layer_sparsities(model, calibration, quiet)
        stats_kind = Statistics.HESSIAN if then_gptq else self.statistics
        staged = []  # GPTQ installs of the previous layer, run after its calibration forward on float weights
        dense_x: list[torch.Tensor] = []  # with target "dense": the dense model's inputs to the current layer

        def process(i, layer, x, fwd):
            install_staged(staged)
            cross = {}
            if self.target == "dense":
                xd = dense_x.pop() if dense_x else x
                pairs = cross_statistics(layer, x, xd, fwd)
                dense_x.append(fwd.layer(layer, xd))  # the dense layer's output: the next layer's dense inputs
                stats = {a: h if stats_kind is not Statistics.DIAGONAL else torch.diagonal(h)
                         for a, (h, _) in pairs.items()}
                cross = {a: cc for a, (_, cc) in pairs.items()}
            else:
                stats = {} if stats_kind is Statistics.NONE else layer_hessians(
                    layer, x, fwd, diagonal_only=stats_kind is Statistics.DIAGONAL)
            for parent, attr, lin in list(projections(layer)):
                name = f"layers.{i}.{attr}"
                if cross:
                    lin.weight.data.copy_(refit_to_dense_target(lin.weight.data, pairs[attr][0], cross[attr],
                                                                getattr(self, "damp_ratio", 0.01)))
                pruned, keep = self.prune_weight(lin.weight.data, _diagonal_if(stats.get(attr), self.statistics),
                                                 sparsities[i], name)
                lin.weight.data.copy_(pruned)
                set_pruned_mask(lin, keep)
                if then_gptq:
                    staged.append(then_gptq[0].stage_linear(parent, attr, stats[attr], then_gptq[1], name))
            return f"layer {i}: {sparsities[i]:.0%}"

        if stats_kind is Statistics.NONE and self.target == "pruned":
            for i, layer in enumerate(model.layers):
                process(i, layer, None, None)
        else:
            run_sequential(model, calibration, process, f"{self.name} {self.label()}", quiet,
                           CALIBRATION_CHUNK_WINDOWS)
        install_staged(staged)
        report = {"sparsity": self.sparsity, "pattern": self.pattern, "layerwise": self.layerwise.value,
                  "layer_sparsity": [round(s, 4) for s in sparsities]}
        if calibration is not None and self.needs_calibration:
            report["calibration_tokens"] = calibration.numel()
        return report

    def layer_sparsities(self, model, calibration: torch.Tensor | None, quiet: bool = False) -> list[float]:
        """Each decoder layer's sparsity: the target everywhere, or OWL's allocation from the dense model's Wanda
        scores (or, `sensitivity`, from its block importance) on the first few calibration windows."""
        num_layers = len(model.layers)
        if self.layerwise is Layerwise.UNIFORM:
            return [self.sparsity] * num_layers
        if self.layerwise is Layerwise.SENSITIVITY:
            # a layer that turns its input more (layer 0 most, by far, in SmolLM2) loses more when pruned
            scores = measure_importance(model, calibration[:OWL_CALIBRATION_WINDOWS]).layers
            return owl_sparsities([float(v) for v in scores], self.sparsity, self.owl_spread)
        ratios = []

        def rank(i, layer, x, fwd):
            norms = layer_hessians(layer, x, fwd, diagonal_only=True)
            scores = [lin.weight.data.abs() * norms[attr].sqrt()[None, :] for _, attr, lin in projections(layer)]
            ratios.append(outlier_ratio(scores, self.owl_threshold))
            return f"layer {i}: outliers {ratios[-1]:.2%}"

        run_sequential(model, calibration[:OWL_CALIBRATION_WINDOWS], rank, "OWL outliers", quiet,
                       CALIBRATION_CHUNK_WINDOWS)
        return owl_sparsities(ratios, self.sparsity, self.owl_spread)


def _diagonal_if(stats: torch.Tensor | None, wanted: Statistics) -> torch.Tensor | None:
    """Wanda reads the diagonal even when the joint pass accumulated full Hessians."""
    if stats is not None and wanted is Statistics.DIAGONAL and stats.dim() == 2:
        return torch.diagonal(stats)
    return stats


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value
