"""Which weights a score keeps: per output row (the comparison group of Wanda, arXiv 2306.11695), or N:M (n kept of
every m consecutive inputs, arXiv 2102.04010), with exactly the requested number pruned."""
from __future__ import annotations

import torch

from pernode.sparse_format import SparsityPattern


def pruned_per_row(rows: int, in_features: int, sparsity: float) -> torch.Tensor:
    """How many weights each row loses so that exactly round(sparsity * rows * in_features) go: floor(sparsity *
    in_features) each, one more for the first rows that make up the remainder."""
    total = int(round(sparsity * rows * in_features))
    base = total // rows
    return torch.full((rows,), base, dtype=torch.long) + (torch.arange(rows) < total - base * rows)


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
    """bool [N, K]: True where a weight stays. Unstructured: the `sparsity` fraction of lowest scores of each row
    go; N:M: the m - n lowest of every group of m columns go (`sparsity` is then implied by the pattern)."""
    n_rows, k = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pattern.is_structured:
        if k % pattern.m:
            raise ValueError(f"pattern {pattern.label()} needs an input size divisible by {pattern.m}, got {k}")
        groups = scores.reshape(n_rows, k // pattern.m, pattern.m)
        drop = groups.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        return keep.view_as(groups).scatter_(-1, drop, False).view(n_rows, k)
    counts = pruned_per_row(n_rows, k, sparsity).to(scores.device)
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = the row's lowest score
    return rank >= counts[:, None]


def nm_keep_in_block(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """N:M keep-mask of a [N, M] slice of columns (SparseGPT chooses each group when its columns come up)."""
    drop = scores.topk(pattern.m - pattern.n, dim=1, largest=False).indices
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum()) / weight.numel()


def follows_pattern(weight: torch.Tensor, pattern: SparsityPattern) -> bool:
    """True when every group of m consecutive inputs of every row has at most n nonzeros."""
    n_rows, k = weight.shape
    nonzeros = (weight != 0).reshape(n_rows, k // pattern.m, pattern.m).sum(-1)
    return bool((nonzeros <= pattern.n).all())
