"""Wanda: prune by |W| x ||X||_2, the weight's magnitude times the norm of its input column over the calibration
tokens, compared within each output row; no weight update (Sun et al. 2023, arXiv 2306.11695)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pernode.shrink.pruning.masks import keep_mask
from pernode.shrink.pruning.pruner import Pruner, Statistics


@dataclass(frozen=True)
class Wanda(Pruner):
    """|W| x ||X|| per output row (or per N:M group)."""

    name: ClassVar[str] = "wanda"
    statistics: ClassVar[Statistics] = Statistics.DIAGONAL

    def prune_weight(self, weight, stats, sparsity, name):
        # stats is 2/n sum x^2 per input column: its square root orders columns as ||X||_2 does
        scores = weight.abs().float() * stats.clamp(min=0).sqrt()[None, :]
        keep = keep_mask(scores, sparsity, self.sparsity_pattern)
        return weight * keep, keep
