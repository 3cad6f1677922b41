"""SparseGPT: prune column by column, choosing the mask in blocks by the OBS saliency w^2 / [H^-1]_cc^2 and pushing
each pruned weight's error onto the columns not yet visited through the inverse Hessian of the layer's calibration
inputs (Frantar & Alistarh 2023, arXiv 2301.00774). The Hessian, its damping and its inverse Cholesky factor are
GPTQ's (`shrink/methods/gptq.py`); with a GPTQ quantizer after it, each layer is pruned then quantized in one pass
on that same Hessian, the paper's joint sparsify-and-quantize."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pernode.shrink.methods.gptq import inverse_hessian_cholesky
from pernode.shrink.methods.modifier import require
from pernode.shrink.pruning.masks import nm_keep_in_block
from pernode.shrink.pruning.pruner import Pruner, Statistics
from pernode.sparse_format import SparsityPattern


@dataclass(frozen=True)
class SparseGPT(Pruner):
    """OBS pruning with masks chosen per `block_size` columns; damping `damp_ratio` of the mean Hessian diagonal."""

    name: ClassVar[str] = "sparsegpt"
    statistics: ClassVar[Statistics] = Statistics.HESSIAN

    block_size: int = 128
    damp_ratio: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.block_size, int) and self.block_size >= 1, "block_size", self.block_size, ">= 1")
        require(isinstance(self.damp_ratio, (int, float)) and self.damp_ratio > 0, "damp_ratio", self.damp_ratio,
                "> 0 (a fraction of the mean Hessian diagonal; 0.01 is the paper's)")

    def prune_weight(self, weight, stats, sparsity, name):
        return sparsegpt_prune_weight(weight, stats, sparsity, self.sparsity_pattern, self.block_size,
                                      self.damp_ratio, name)


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                           pattern: SparsityPattern = SparsityPattern(), block_size: int = 128,
                           damp_ratio: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight [N, K], keep-mask) minimising ||W X - W' X|| for the inputs behind `hessian`. Unstructured:
    exactly round(sparsity * N * K) weights go, the count spread over blocks by their OBS saliency; N:M: each
    group of m columns is decided when the sweep reaches it, on the error-updated weights."""
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do nothing, prune them first
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_cholesky(h, damp_ratio, name)
    if pattern.is_structured:
        if k % pattern.m:
            raise ValueError(f"{name}: pattern {pattern.label()} needs an input size divisible by {pattern.m}, got {k}")
        block_size = pattern.m * max(1, block_size // pattern.m)  # a group must not straddle two blocks
    keep = torch.ones(n, k, dtype=torch.bool)
    target_total = int(round(sparsity * n * k))
    pruned = 0
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if not pattern.is_structured:  # this block's share of the layer's count, by the blocks' columns so far
            count = int(round(target_total * i2 / k)) - pruned
            if count > 0:
                saliency = (w1 ** 2 / d[None, :] ** 2).flatten()
                keep1.view(-1)[saliency.topk(count, largest=False).indices] = False
            pruned += max(count, 0)
        for i in range(i2 - i1):
            if pattern.is_structured and i % pattern.m == 0:
                m = slice(i, i + pattern.m)
                keep1[:, m] = nm_keep_in_block(w1[:, m] ** 2 / d[None, m] ** 2, pattern)
            wc = w1[:, i]
            target = torch.where(keep1[:, i], wc, torch.zeros_like(wc))
            e = (wc - target) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = target
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return (w * keep).to(weight.dtype), keep
