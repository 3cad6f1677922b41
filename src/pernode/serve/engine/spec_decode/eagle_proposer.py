"""The EAGLE proposer: an EAGLE head (eagle_head.py; Li et al. 2024, arXiv 2401.15077) drafts from the target's own
last hidden states.

After every forward the engine hands the proposer the target's hidden states of the step's rows (`observe`); the
proposer keeps, per request, the features of positions it has not yet fed to the head. When it proposes for a
request with tokens x_0..x_{n-1} (x_{n-1} not yet run through the target), every position p < n - 1 is verified:
the head catches up on the pairs (f_p, x_{p+1}) it has not seen, with the true features, which extends its own K/V
cache (one layer, per request, only ever holding verified positions); its output at p = n - 2 predicts f_{n-1},
whose lm_head row gives the first draft token. Further drafts chain on the head's own predicted features, on a
throw-away extension of that cache, so a rejection needs no rollback here: the next catch-up starts from the
verified positions again. Features of rows the verifier rejects are overwritten when the positions are computed
again. A preemption (new K/V, recomputed from the start) resets the request's head state; a prefix-cache hit has
no features for the cached positions, so the head's cache starts where the target's computation did.

Tokens come from the target's own final norm and lm_head (fp32 logits, as the target samples); greedy requests
take the argmax, sampled ones draw from the sampler's own distribution over those logits, which is the q handed to
the rejection sampler, so verification stays exact either way. With a `draft_vocab.json` in the head's folder
(FR-Spec, draft_vocab.py) only those rows of the lm_head are scored, the head's largest cost otherwise; a sampled
request's q is then the distribution over the subset, zero elsewhere, which keeps rejection sampling exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pernode.serve.engine.request import Request
from pernode.serve.engine.spec_decode.adaptive import StepCostModel
from pernode.serve.engine.spec_decode.draft_vocab import read_draft_vocab
from pernode.serve.engine.spec_decode.eagle_head import EagleHead, dense_weight
from pernode.serve.engine.spec_decode.eagle_serving import install_int8_projections, lm_head_rows
from pernode.serve.engine.spec_decode.proposal import Proposal
from pernode.serve.engine.spec_decode.rejection_sampler import ExtendedHistory, needs_per_position_processing
from pernode.serve.kernels.dense_linear import Linear
from pernode.serve.models.fp32_logits import sampled_logits
from pernode.serve.sampling.sampler import draw, is_greedy, row_probs


@dataclass
class _HeadState:
    preemptions: int
    first: int = -1  # first position with a feature (the head's cache starts there); -1: none yet
    features: list = field(default_factory=list)  # normed target features of positions first..first+len-1
    done: int = 0  # pairs fed to the head: positions first..first+done-1
    kv: tuple | None = None  # the head's (K, V) over those positions


class EagleProposer:
    needs_blocks_ahead = False  # the head's cache is its own; the target's blocks are allocated as for prompt lookup

    def __init__(self, path: str, target, device: torch.device, dtype: torch.dtype):
        self.head = EagleHead.load(path)
        self.head.check_target(target)
        self.head.to(device=device, dtype=dtype).eval()
        self.target = target
        self.dtype = dtype
        self.states: dict[str, _HeadState] = {}
        # seconds of one head call (its layer and lm_head) by the pairs it reads; the planner adds one call per
        # proposing request and token (adaptive.plan_num_tokens, per_request)
        self.forward_cost = StepCostModel()
        ids = read_draft_vocab(path, target.config.vocab_size)
        self.vocab_ids = None if ids is None else torch.tensor(ids, dtype=torch.long, device=device)
        self.vocab_list = ids
        self.reduced_head = None
        if device.type == "cpu":  # int8 GEMVs (eagle_serving.py); on CUDA the float weights run as they are
            install_int8_projections(self.head)
            if ids is not None:
                self.reduced_head = lm_head_rows(target.lm_head, self.vocab_ids)
        elif ids is not None:  # the subset's rows of the target's lm_head (dequantized)
            rows = dense_weight(target.lm_head)[self.vocab_ids.cpu()]
            self.reduced_head = Linear(rows.shape[1], len(ids), bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                self.reduced_head.weight.copy_(rows)

    def forget(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def _state(self, request: Request) -> _HeadState:
        state = self.states.get(request.request_id)
        if state is None or state.preemptions != request.num_preemptions:
            state = self.states[request.request_id] = _HeadState(request.num_preemptions)
        return state

    @torch.inference_mode()
    def observe(self, requests: list[Request], num_new_tokens: list[int], hidden: torch.Tensor) -> None:
        """The target's last hidden states (before its final norm) of a forward's rows, laid out request after
        request, `num_new_tokens` each from its `num_computed_tokens` (the step's start)."""
        normed = self.target.norm(hidden)
        row = 0
        for r, n in zip(requests, num_new_tokens):
            state = self._state(r)
            start = r.num_computed_tokens
            if state.first < 0 or start < state.first or start > state.first + len(state.features):
                # first rows seen (a prefix-cache hit starts past 0), or a gap: the head's cache starts here
                state.first, state.features, state.done, state.kv = start, [], 0, None
            keep = start - state.first
            del state.features[keep:]  # rows rejected last step are computed again from here
            if state.done > keep:  # never: the head only reads verified positions, all below any new row
                state.done, state.kv = keep, (state.kv[0][:, :, :keep], state.kv[1][:, :, :keep])
            state.features.extend(normed[row:row + n].unbind(0))
            row += n

    def catch_up_tokens(self, request: Request, k_max: int) -> float:
        """Pairs the head's first forward for `request` reads (the adaptive rule's price of that forward)."""
        state = self.states.get(request.request_id)
        if state is None or state.first < 0:
            return 1.0
        return float(max(1, request.num_computed_tokens - state.first - state.done))

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Proposal]:
        out = []
        for r, k in zip(requests, num_tokens):
            out.append(self._propose_one(r, k) if k > 0 else Proposal([]))
        return out

    def _head_logits(self, features: torch.Tensor, tokens: list[int], positions: list[int], past
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(fp32 logits of the last pair's prediction [vocab], the normed predicted features [L, d], K/V)."""
        device = features.device
        embeds = self.target.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=device))
        rotary = self.target.rotary
        h, kv = self.head.layer_output(features[None].to(self.dtype), embeds[None].to(self.dtype),
                                 torch.tensor(positions, dtype=torch.long, device=device), rotary.cos, rotary.sin,
                                 past)
        h = h[0]
        normed = self.target.norm(h[-1:])
        if self.reduced_head is not None:  # FR-Spec: logits over the subset only
            return self.reduced_head(normed)[0].float(), normed, kv
        logits = sampled_logits(self.target.norm, self.target.lm_head, h[-1:])[0]
        return logits, normed, kv

    def _propose_one(self, request: Request, k: int) -> Proposal:
        state = self._state(request)
        verified = request.num_computed_tokens  # positions < verified have true features; x_verified is the last
        if state.first < 0 or verified > state.first + len(state.features):
            return Proposal([])
        ids = request.all_token_ids
        lo, hi = state.first + state.done, verified  # pairs (f_p, x_{p+1}) for p in [lo, hi)
        if hi <= lo:
            return Proposal([])
        started = time.perf_counter()
        feats = torch.stack(state.features[lo - state.first:hi - state.first])
        logits, f_prev, kv = self._head_logits(feats, ids[lo + 1:hi + 1], list(range(lo, hi)), state.kv)
        state.kv, state.done = kv, hi - state.first
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        past, read = kv, hi - lo
        while True:
            token, q = self._sample(logits, request, tokens)
            tokens.append(token)
            if q is not None:
                probs.append(q)
            now = time.perf_counter()
            self.forward_cost.record(read, now - started)  # this call, its sampling included
            if len(tokens) == k:
                break
            started, read = now, 1
            logits, f_prev, past = self._head_logits(f_prev, [token], [hi + len(tokens) - 1], past)
        return Proposal(tokens, torch.stack(probs) if probs else None)

    def _sample(self, logits: torch.Tensor, request: Request, proposed: list[int]) -> tuple[int, torch.Tensor | None]:
        """The head's token under the request's sampling rules and the distribution it came from (None: greedy)."""
        if is_greedy(request.params) and not needs_per_position_processing(request):
            index = int(logits.argmax())
            return (self.vocab_list[index] if self.vocab_list is not None else index), None
        if self.vocab_ids is not None:  # q over the subset: -inf elsewhere
            full = logits.new_full((self.target.config.vocab_size,), float("-inf"))
            full[self.vocab_ids] = logits
            logits = full
        q = row_probs(logits, ExtendedHistory(request, list(proposed)))
        if is_greedy(request.params):
            return int(q.argmax()), None
        return draw(q, request.generator), q
