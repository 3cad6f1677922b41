"""Exact verification of proposed tokens: the output follows the target's distribution whatever was proposed.

Modified rejection sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318): accept proposed
token x with probability min(1, p(x) / q(x)); at the first rejection draw from norm(max(0, p - q)) and stop; if
all are accepted, draw one more token from p. p is the distribution the sampler itself would draw from at that
position (penalties, min_tokens, temperature, top-k/top-p/min-p: `row_probs`), over the history that includes the
tokens accepted before it. Greedy requests reduce to: accept while the target's argmax equals the proposal.
"""
from __future__ import annotations

import torch

from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.sampler import SamplingState, draw, is_greedy, row_probs


class ExtendedHistory:
    """A request seen as if `extra` tokens had been appended: what penalties and min_tokens read at a position
    past the request's real tokens."""

    def __init__(self, request: SamplingState, extra: list[int] | None = None):
        self.request = request
        self.extra = extra if extra is not None else []
        self.params: SamplingParams = request.params
        self.eos_token_ids = request.eos_token_ids
        self.generator = request.generator

    @property
    def all_token_ids(self) -> list[int]:
        return list(self.request.all_token_ids) + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return list(self.request.output_token_ids) + self.extra

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens + len(self.extra)


def needs_per_position_processing(request: SamplingState) -> bool:
    """Whether a position's distribution depends on the tokens before it beyond the logits themselves."""
    p = request.params
    return p.uses_penalties or request.num_output_tokens < p.min_tokens


def verify(logits: torch.Tensor, request: SamplingState, proposed: list[int],
           draft_probs: torch.Tensor | None) -> list[int]:
    """The tokens this step emits for `request`: the accepted prefix of `proposed`, then one token drawn by the
    target (the correction at the first rejection, or the bonus after all were accepted).

    `logits` has len(proposed) + 1 rows: row i scores the token after proposed[:i]. `draft_probs` is the
    proposer's distribution for each proposed token, or None for a deterministic proposer (one-hot q)."""
    k = len(proposed)
    if is_greedy(request.params) and not needs_per_position_processing(request):
        target = logits[:k + 1].argmax(dim=-1).tolist()
        out = []
        for i in range(k):
            if target[i] != proposed[i]:
                break
            out.append(proposed[i])
        out.append(target[len(out)])
        return out
    history = ExtendedHistory(request)
    generator = request.generator
    for i, token in enumerate(proposed):
        p = row_probs(logits[i], history)
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        p_token = float(p[token])
        # accept with probability min(1, p/q); u * q <= p avoids dividing by a q that underflowed to 0
        u = float(torch.rand((), generator=generator))
        if q_token > 0 and u * q_token <= p_token:
            history.extra.append(token)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i].to(p.device)).clamp_min_(0.0)
        total = float(residual.sum())
        # Only float rounding can leave nothing (p == q up to rounding): then p itself is the right law.
        residual = residual / total if total > 0 else p
        return history.extra + [draw(residual, generator)]
    p = row_probs(logits[k], history)
    bonus = int(p.argmax()) if is_greedy(request.params) else draw(p, generator)
    return history.extra + [bonus]
