"""What a draft's acceptance should be, computed without the engine's incremental machinery.

Under greedy verification a draft's proposal is accepted exactly when it equals the target's next token, and as
long as the draft agrees its own context equals the target's. So the engine's greedy acceptance is fixed by one
teacher-forced pass: the draft's top-1 after every prefix of the target's own output (one prefill into scratch
K/V, no draft progress counters, no rollback, no shared blocks), replayed through the engine's rounds (k proposals,
the run of agreements accepted, one token from the target). A gap between this replay and the engine's counters
is a bug in the incremental path (positions, draft K/V catch-up, rollback, reduced-head mapping), not a weak draft.

Speculative decoding: Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pernode.serve.kernels.attention_metadata import AttentionMetadata


@torch.inference_mode()
def draft_top1(proposer, token_ids: list[int]) -> list[int]:
    """The draft's greedy token after each prefix token_ids[:i+1] (its reduced head mapped back to vocabulary
    ids when it has one), from one prefill of the whole sequence into scratch K/V."""
    if not token_ids:
        raise ValueError("token_ids must not be empty")
    c, bs, device = proposer.config, proposer.block_size, proposer.device
    num_blocks = -(-len(token_ids) // bs)
    dtype = proposer.kv_caches[0][0].dtype
    shape = (num_blocks, bs, c.num_key_value_heads, c.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(c.num_hidden_layers)]
    meta = AttentionMetadata.build(np.arange(num_blocks, dtype=np.int32)[None, :], [0], [len(token_ids)], bs, device)
    rows = torch.arange(len(token_ids), dtype=torch.long, device=device)
    logits = proposer.model(torch.tensor(token_ids, dtype=torch.long, device=device), rows, caches, meta, rows)
    top = logits.argmax(dim=-1).tolist()
    head = proposer.reduced_head
    return [head.token_id(i) for i in top] if head is not None else top


def agreement(proposer, prompt_ids: list[int], output_ids: list[int]) -> list[bool]:
    """agree[j] (j >= 1): the draft, fed the prompt and output_ids[:j], predicts output_ids[j]. agree[0] is False
    (the first output token comes from the target's prefill, never from a proposal)."""
    if not output_ids:
        return []
    top = draft_top1(proposer, list(prompt_ids) + list(output_ids[:-1]))
    n = len(prompt_ids)
    return [False] + [top[n + j - 1] == output_ids[j] for j in range(1, len(output_ids))]


@dataclass
class ReplayedAcceptance:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def add(self, other: "ReplayedAcceptance") -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


def replay_greedy(agree: list[bool], k: int, max_tokens: int | None = None) -> ReplayedAcceptance:
    """The engine's rounds over one greedy output of len(agree) tokens at a fixed k (adaptive off): after the
    prefill's token, each round proposes min(k, tokens left - 1) tokens, accepts the run of agreements and adds
    the target's token. `max_tokens` (default len(agree)) caps proposals as the engine does; the output must have
    run to it (ignore_eos), else the last round's count past the end of the output is not defined here."""
    if k < 1:
        raise ValueError(f"k={k} is out of range: allowed >= 1")
    n = len(agree)
    limit = n if max_tokens is None else max_tokens
    out, produced = ReplayedAcceptance(), 1 if n else 0
    while produced < n:
        proposed = min(k, limit - produced - 1)
        if proposed <= 0:
            produced += 1
            continue
        accepted = 0
        while accepted < proposed and produced + accepted < n and agree[produced + accepted]:
            accepted += 1
        out.num_drafts += 1
        out.num_draft_tokens += proposed
        out.num_accepted_tokens += accepted
        produced += accepted + 1
    return out
