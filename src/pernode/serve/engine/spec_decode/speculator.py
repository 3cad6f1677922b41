"""Speculative decoding in the engine's loop, request-centric as in vLLM v1: before scheduling, decoding requests
get proposed tokens (`Request.spec_token_ids`), which the scheduler counts in the token budget like any others;
the forward scores them all at once; `sample` verifies them exactly; `roll_back` drops the K/V of the rejected
ones (num_computed_tokens pulled back, blocks past the kept tokens freed, none ever registered in the prefix
cache).

Speculative decoding: Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318.
"""
from __future__ import annotations

import time

import torch

from pernode.config import ModelConfig, SpeculativeConfig
from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.request import Request
from pernode.serve.engine.spec_decode.adaptive import (AcceptanceTracker, StepCostModel,
                                                       max_proposed_without_switching, plan_num_tokens)
from pernode.serve.engine.spec_decode.draft_proposer import DraftModelProposer
from pernode.serve.engine.spec_decode.eagle_proposer import EagleProposer
from pernode.serve.engine.spec_decode.ngram_proposer import NgramProposer
from pernode.serve.engine.spec_decode.proposal import Proposal
from pernode.serve.engine.spec_decode.rejection_sampler import verify
from pernode.serve.engine.spec_decode.spec_stats import SpecDecodeStats
from pernode.serve.sampling.sampler import SampleResult, Sampler
from pernode.serve.sampling.structured.token_masks import TokenMasks
from pernode.serve.tokenizer import Tokenizer


class SpeculativeSampleResult(SampleResult):
    """A SampleResult whose rows may emit several tokens: `rows[i]` lists (token, logprob, top logprobs)."""

    def __init__(self, rows: list[list[tuple[int, float | None, list[tuple[int, float]] | None]]]):
        super().__init__([r[-1][0] for r in rows], [r[-1][1] for r in rows], [r[-1][2] for r in rows])
        self.rows = rows

    def row(self, i: int) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        return self.rows[i]


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: NgramProposer | DraftModelProposer | EagleProposer,
                 switch_rows: tuple[list[int], list[int]] = ([], [])):
        self.config = config
        self.proposer = proposer
        # row counts where the target's linear layers change kernel (decoder's, lm_head's): a verifying step never
        # crosses one that the step without proposals would not, so verified rows are computed as decodes are
        self.switch_rows = switch_rows
        self.verify_cost = StepCostModel()  # engine steps (forward + sampling) by token count
        self.propose_cost = StepCostModel()  # proposer calls by tokens proposed (prompt lookup's price)
        self.acceptance = AcceptanceTracker()
        self.stats = SpecDecodeStats()
        self._proposals: dict[str, Proposal] = {}
        self._num_emitted: dict[str, int] = {}  # tokens the last verification emitted, for roll_back

    @classmethod
    def create(cls, config: SpeculativeConfig, target_config: ModelConfig, tokenizer: Tokenizer, num_blocks: int,
               block_size: int, device: torch.device, dtype: torch.dtype, max_model_len: int,
               switch_rows: tuple[list[int], list[int]] = ([], []), target_model=None) -> Speculator:
        if config.method == "ngram":
            return cls(config, NgramProposer(config.ngram_min, config.ngram_max), switch_rows)
        if config.method == "eagle":
            if target_model is None:
                raise ValueError("speculative.method='eagle' needs the served model (its hidden states)")
            target_model.keep_hidden_states = True
            return cls(config, EagleProposer(config.draft_model, target_model, device, dtype), switch_rows)
        return cls(config, DraftModelProposer(config.draft_model, target_config, tokenizer, num_blocks, block_size,
                                              device, dtype, max_model_len), switch_rows)

    # ---- before scheduling: propose --------------------------------------------------------------------
    def propose(self, running: list[Request], kv: KVCacheManager, token_budget: int, max_model_len: int) -> None:
        """Give each decoding request its proposed tokens for this step (possibly none)."""
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and _may_speculate(r)]
        for r in running:
            r.spec_token_ids = []
        if not decoding:
            return
        other_tokens = min(sum(r.num_tokens - r.num_computed_tokens for r in running) - len(decoding), token_budget)
        room = max(0, token_budget - other_tokens - len(decoding))  # proposed tokens the budget can take at all
        k_max = min(self.config.k, room)
        decoder_switches, head_switches = self.switch_rows
        max_total = min(room, max_proposed_without_switching(other_tokens + len(decoding), decoder_switches),
                        max_proposed_without_switching(len(decoding), head_switches))
        if k_max == 0:
            return
        if max_total == 0:
            self.stats.num_steps_declined += 1
            return
        if self.config.adaptive:
            draft = self.proposer if isinstance(self.proposer, (DraftModelProposer, EagleProposer)) else None
            plan = plan_num_tokens([self.acceptance.rate(r.request_id) for r in decoding], k_max, other_tokens,
                                   self.verify_cost, self.propose_cost if draft is None else draft.forward_cost,
                                   max_total, None if draft is None else
                                   [draft.catch_up_tokens(r, k_max) for r in decoding],
                                   per_request=isinstance(draft, EagleProposer))
        else:  # k each, as far as max_total goes
            plan = [min(k_max, max(0, max_total - i * k_max)) for i in range(len(decoding))]
        # never past max_tokens or max_model_len: those tokens would be thrown away (or have no position)
        plan = [max(0, min(k, max_model_len - r.num_tokens - 1,
                           (r.params.max_tokens or max_model_len) - r.num_output_tokens - 1))
                for r, k in zip(decoding, plan)]
        # Blocks for the proposals now (the draft writes K/V into them; the verifying step needs them anyway), but
        # never the blocks the decoding requests may need for their own next token: speculation must not preempt.
        reserve = len(decoding)
        if self.proposer.needs_blocks_ahead:
            plan = [k if k > 0 and self._allocate(r, k, kv, reserve) else 0 for r, k in zip(decoding, plan)]
        if not any(plan):
            self.stats.num_steps_declined += 1
            return
        started = time.perf_counter()
        proposals = self.proposer.propose(decoding, plan)
        self.propose_cost.record(sum(plan), time.perf_counter() - started)  # a draft times its own forwards
        for r, proposal in zip(decoding, proposals):
            if proposal.token_ids and (self.proposer.needs_blocks_ahead
                                       or self._allocate(r, len(proposal.token_ids), kv, reserve)):
                r.spec_token_ids = list(proposal.token_ids)
                self._proposals[r.request_id] = proposal

    @staticmethod
    def _allocate(request: Request, num_proposed: int, kv: KVCacheManager, reserve: int) -> bool:
        needed = kv.blocks_needed(request.num_tokens + num_proposed) - len(request.block_ids)
        return needed <= 0 or (kv.pool.num_free - needed >= reserve
                               and kv.allocate(request, request.num_tokens + num_proposed - request.num_computed_tokens))

    # ---- after the forward: verify ---------------------------------------------------------------------
    def observe(self, batch, model) -> None:
        """Hand an EAGLE proposer the forward's hidden states (before the step's num_computed_tokens advance)."""
        if isinstance(self.proposer, EagleProposer) and model.last_hidden_states is not None:
            self.proposer.observe(batch.requests, batch.num_new_tokens, model.last_hidden_states)
            model.last_hidden_states = None

    def record_step(self, num_tokens: int, seconds: float) -> None:
        self.verify_cost.record(num_tokens, seconds)

    def sample(self, logits: torch.Tensor, requests: list[Request], sampler: Sampler,
               token_masks: TokenMasks | None = None) -> SampleResult:
        """Tokens of each request that samples this step. Requests without proposals go through the sampler as
        usual (one row each, with their grammar masks: `token_masks` rows index `requests`); the others have
        1 + len(spec_token_ids) rows, verified exactly."""
        if not any(r.spec_token_ids for r in requests):
            return sampler(logits, requests, token_masks)
        starts, plain_rows, plain, plain_index = [], [], [], {}
        row = 0
        for i, r in enumerate(requests):
            starts.append(row)
            if not r.spec_token_ids:
                plain_rows.append(row)
                plain_index[i] = len(plain)
                plain.append(r)
            row += 1 + len(r.spec_token_ids)
        if token_masks is not None:  # constrained requests never speculate, so every masked row is a plain one
            token_masks = TokenMasks([plain_index[i] for i in token_masks.rows], token_masks.allowed)
        plain_result = sampler(logits[plain_rows], plain, token_masks) if plain else None
        out, j = [], 0
        self.stats.num_steps_speculating += 1
        for r, start in zip(requests, starts):
            if not r.spec_token_ids:
                out.append([(plain_result.token_ids[j], plain_result.logprobs[j], plain_result.top_logprobs[j])])
                j += 1
                continue
            k = len(r.spec_token_ids)
            rows = logits[start:start + k + 1]
            proposal = self._proposals.pop(r.request_id)
            tokens = verify(rows, r, r.spec_token_ids, proposal.draft_probs)
            num_accepted = len(tokens) - 1
            self._num_emitted[r.request_id] = len(tokens)
            self.stats.record(k, num_accepted)
            self.acceptance.record(r.request_id, k, num_accepted)
            out.append(_with_logprobs(rows, tokens, r.params.logprobs))
        return SpeculativeSampleResult(out)

    def roll_back(self, request: Request, kv: KVCacheManager) -> None:
        """After a verifying step (num_computed_tokens already advanced past every proposed token): forget the K/V
        of the rejected ones. The accepted ones and one more token are about to be appended, the last without K/V."""
        num_accepted = self._num_emitted.pop(request.request_id) - 1
        rejected = len(request.spec_token_ids) - num_accepted
        request.num_computed_tokens -= rejected
        request.spec_token_ids = []
        kv.free_tail(request, request.num_computed_tokens + 1)

    def forget(self, request_id: str) -> None:
        self._proposals.pop(request_id, None)
        self._num_emitted.pop(request_id, None)
        self.acceptance.forget(request_id)
        self.proposer.forget(request_id)


def _may_speculate(request: Request) -> bool:
    """Verification draws from the sampler's distribution without logit_bias, allowed_token_ids or a grammar's
    masks, so requests with any of those decode one token per step (exact, never approximately speculated)."""
    p = request.params
    return p.structured_outputs is None and not p.logit_bias and p.allowed_token_ids is None


def _with_logprobs(rows: torch.Tensor, tokens: list[int], num_logprobs: int | None
                   ) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
    """(token, logprob, top logprobs) for each emitted token, from the raw target distribution at its position,
    as the sampler reports them."""
    if num_logprobs is None:
        return [(t, None, None) for t in tokens]
    logprobs = torch.log_softmax(rows[:len(tokens)].float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(tokens, device=rows.device)[:, None]).squeeze(1).tolist()
    if num_logprobs:
        vals, ids = logprobs.topk(num_logprobs, dim=-1)
        tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, vals)]
    else:
        tops = [[] for _ in tokens]
    return list(zip(tokens, picked, tops))
