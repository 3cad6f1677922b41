"""What a proposer hands the verifier for one request: the proposed tokens and the distribution each was drawn
from (None for a deterministic proposer such as prompt lookup, whose distribution is one-hot on the token)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    token_ids: list[int]
    draft_probs: torch.Tensor | None = None  # [len(token_ids), vocab] fp32, rows summing to 1
