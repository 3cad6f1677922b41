"""Magnitude pruning: the smallest |W| of each output row go (no calibration; the baseline of arXiv 2306.11695 and
arXiv 2301.00774, after Han et al., arXiv 1506.02626)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pernode.shrink.pruning.masks import keep_mask
from pernode.shrink.pruning.pruner import Pruner


@dataclass(frozen=True)
class Magnitude(Pruner):
    """Keep the largest |w| per row (or per N:M group)."""

    name: ClassVar[str] = "magnitude"

    def prune_weight(self, weight, stats, sparsity, name):
        keep = keep_mask(weight.abs().float(), sparsity, self.sparsity_pattern)
        return weight * keep, keep
