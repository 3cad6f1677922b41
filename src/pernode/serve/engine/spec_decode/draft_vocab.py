"""A reduced-vocabulary draft head: the draft scores only the N most frequent tokens.

FR-Spec (Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative
Sampling", arXiv 2502.14856). A small draft spends a large share of each step on its lm_head (SmolLM2's is 49152 x
576, as many parameters as eight of its decoder layers), yet the teacher's replies use a few thousand tokens most of
the time. The draft's lm_head keeps only the rows of a frequency-ranked subset; verification by the target is
unchanged, so greedy output stays exact, and for sampled requests the draft's q is its distribution over the subset
(zero elsewhere), the distribution its token was really drawn from, so rejection sampling stays exact.

The subset is a `draft_vocab.json` file in the draft's folder ({"token_ids": [...], ...}); it is written by
`pernode distill --draft-vocab N` (shrink/distill/draft_vocab.py) from token counts of the teacher's own
generations and the training text.
"""
from __future__ import annotations

import json
import os

import torch

from pernode.serve.kernels.dense_linear import Linear

DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(folder: str, vocab_size: int) -> list[int] | None:
    """The token ids of `folder/draft_vocab.json`, checked against the vocabulary; None when there is none."""
    path = os.path.join(folder, DRAFT_VOCAB_FILE) if os.path.isdir(folder) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        ids = json.load(f).get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{path}: token_ids must be a non-empty list of token ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"{path}: token_ids must be distinct ids in 0..{vocab_size - 1} (got {bad[:3] or 'repeats'})")
    return ids


class ReducedVocabHead:
    """The draft's lm_head cut to `token_ids`: installs the cut head on the model (its logits are then over the
    subset, in subset order) and maps those logits back to full-vocabulary ids."""

    def __init__(self, model, token_ids: list[int]):
        self.vocab_size = model.config.vocab_size
        weight = model.lm_head.weight  # tied: the embedding; the embedding itself keeps every row
        device = weight.device
        self.token_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        head = Linear(weight.shape[1], len(token_ids), bias=False, device=device, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight.detach()[self.token_ids])
        head.weight.requires_grad_(False)
        model.lm_head = head
        self._ids_list = token_ids

    def __len__(self) -> int:
        return len(self._ids_list)

    def token_id(self, sub_index: int) -> int:
        return self._ids_list[sub_index]

    def full_logits(self, sub_logits: torch.Tensor) -> torch.Tensor:
        """[..., N] subset logits -> [..., vocab] with -inf outside the subset: softmax gives q over the subset."""
        out = sub_logits.new_full((*sub_logits.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.token_ids] = sub_logits
        return out
