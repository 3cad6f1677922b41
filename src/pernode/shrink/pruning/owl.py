"""Outlier-weighted layerwise sparsity (OWL, arXiv 2310.05175): layers with more outlier weights (Wanda score
|W| x ||X|| above `threshold` times the layer's mean) keep more of their weights, within +-`spread` of the target,
the mean sparsity over the layers staying at the target."""
from __future__ import annotations

import torch


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of a layer's weights (all its projections) whose score is above `threshold` x the layer's mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold * flat.mean()).sum()) / flat.numel()


def owl_sparsities(ratios: list[float], target: float, spread: float) -> list[float]:
    """Per-layer sparsity: outlier ratios mapped linearly onto [target - spread, target + spread] (most outliers ->
    least sparse), then shifted so their mean is `target`; clipped to [0, 0.99] (the shift is redone after the
    clip, so the mean stays the target unless the whole range does not fit)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = (r.max() - r.min()).item()
    density = (r - r.min()) / span * 2 * spread if span > 0 else torch.zeros_like(r)
    density = density - density.mean() + (1 - target)
    sparsity = (1 - density).clamp(0.0, 0.99)
    sparsity = sparsity - sparsity.mean() + target
    return [float(s) for s in sparsity.clamp(0.0, 0.99)]
