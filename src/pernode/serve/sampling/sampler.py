"""Turns a batch of logits into next tokens, each row under its own request's sampling parameters."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.structured.token_masks import TokenMasks

# A temperature below this samples greedily (vLLM's _SAMPLING_EPS): at such temperatures the distribution is the
# argmax to within float precision, and dividing raw logits by them overflows (inf - inf = NaN in the softmax).
GREEDY_TEMPERATURE_EPS = 1e-5
_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max


class SamplingState(Protocol):
    """What the sampler reads of a request (the engine's `Request` is one)."""

    params: SamplingParams
    eos_token_ids: list[int]
    generator: torch.Generator | None

    @property
    def all_token_ids(self) -> Sequence[int]: ...

    @property
    def output_token_ids(self) -> Sequence[int]: ...

    @property
    def num_output_tokens(self) -> int: ...


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # log-probability of each sampled token (rows that asked for logprobs)
    top_logprobs: list[list[tuple[int, float]] | None]  # top-N (token, logprob) per row where requested

    def row(self, i: int) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """(token, logprob, top logprobs) of each token row i emits: one here; several when verifying proposals."""
        return [(self.token_ids[i], self.logprobs[i], self.top_logprobs[i])]


def apply_penalties(logits: torch.Tensor, request: SamplingState) -> torch.Tensor:
    """Repetition penalty over prompt and output (CTRL, as HF applies it); presence and frequency penalties over
    the output only (OpenAI's definitions)."""
    p = request.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
        out = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.zeros_like(logits).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask tokens outside top-k, outside the top-p nucleus, or below min_p times the top probability."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


def apply_token_constraints(logits: torch.Tensor, requests: Sequence[SamplingState],
                            token_masks: TokenMasks | None) -> torch.Tensor:
    """Logits with each row's logit_bias added, tokens outside its allowed_token_ids and outside its grammar's
    mask set to -inf; the input is left as is (logprobs come from the raw distribution). A row whose constraints
    leave no token keeps its grammar's (or else its raw) logits, so it can still be sampled."""
    rows = [i for i, r in enumerate(requests) if r.params.logit_bias or r.params.allowed_token_ids is not None]
    if not rows and token_masks is None:
        return logits
    out = logits.clone()
    if token_masks is not None:
        token_masks.apply(out)
    vocab = out.shape[-1]
    for i in rows:
        p = requests[i].params
        row = out[i]
        before = row.clone()
        if p.allowed_token_ids is not None:
            keep = torch.tensor([t for t in p.allowed_token_ids if t < vocab], dtype=torch.long, device=out.device)
            banned = torch.ones(vocab, dtype=torch.bool, device=out.device)
            banned[keep] = False
            row.masked_fill_(banned, float("-inf"))
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < vocab], dtype=torch.long, device=out.device)
            bias = torch.tensor([p.logit_bias[t] for t in ids.tolist()], dtype=out.dtype, device=out.device)
            row.index_add_(0, ids, bias)
        if not torch.isfinite(row).any():
            row.copy_(before)
    return out


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE_EPS


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The fp32 distribution one row draws from (temperature, then top-k/top-p/min-p): finite and summing to 1
    for any valid params, whatever the logits' scale or dtype, as long as one token is possible. A greedy
    temperature (< GREEDY_TEMPERATURE_EPS) gives the argmax all the mass. Otherwise the logits are shifted so
    their maximum is 0 before the division: every scaled value is then <= 0 and can only underflow towards -inf,
    never overflow to +inf. A temperature beyond float32's range would become inf (-inf / inf = NaN for a masked
    token): it is capped, which changes nothing (the distribution is already uniform over the possible tokens)."""
    logits = logits.float()
    if is_greedy(params):
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    top = logits.max()
    if torch.isfinite(top):
        logits = (logits - top) / min(params.temperature, _FLOAT32_MAX)
    logits = filter_logits(logits, params.top_k, params.top_p, params.min_p)
    return torch.softmax(logits, dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[SamplingState],
                 token_masks: TokenMasks | None = None) -> SampleResult:
        raw = logits
        logits = apply_token_constraints(logits, requests, token_masks)
        greedy_rows = [i for i, r in enumerate(requests) if is_greedy(r.params) and not self._needs_processing(r)]
        token_ids = [0] * len(requests)
        if len(greedy_rows) == len(requests):  # an all-greedy batch: one argmax, no gather, one host copy
            token_ids = logits.argmax(dim=-1).tolist()
        elif greedy_rows:
            idx = torch.tensor(greedy_rows, device=logits.device)
            for row, tok in zip(greedy_rows, logits[idx].argmax(dim=-1).tolist()):
                token_ids[row] = tok
        greedy = set(greedy_rows)
        for i, request in enumerate(requests):
            if i not in greedy:
                token_ids[i] = self._sample_row(logits[i].clone(), request)

        # Logprobs (of the raw model distribution) only for the rows that asked: a full-vocab log_softmax per
        # row is not free at large batch.
        sampled_lp: list[float | None] = [None] * len(requests)
        top: list[list[tuple[int, float]] | None] = [None] * len(requests)
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            logprobs = torch.log_softmax(raw[idx], dim=-1)
            chosen = torch.tensor([token_ids[i] for i in rows], device=logits.device)
            picked = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
            k_max = max(requests[i].params.logprobs for i in rows)
            vals, ids = (logprobs.topk(k_max, dim=-1) if k_max else (None, None))
            for j, i in enumerate(rows):
                sampled_lp[i] = picked[j]
                k = requests[i].params.logprobs
                top[i] = list(zip(ids[j, :k].tolist(), vals[j, :k].tolist())) if k else []
        return SampleResult(token_ids, sampled_lp, top)

    @staticmethod
    def _needs_processing(request: SamplingState) -> bool:
        return request.params.uses_penalties or request.num_output_tokens < request.params.min_tokens

    def _sample_row(self, logits: torch.Tensor, request: SamplingState) -> int:
        logits = processed_logits(logits, request)
        if is_greedy(request.params):
            return int(logits.argmax())
        return draw(sampling_probs(logits, request.params), request.generator)


def processed_logits(logits: torch.Tensor, request: SamplingState) -> torch.Tensor:
    """Penalties and the min_tokens ban applied (in place) to one row: what temperature and filters then see."""
    p = request.params
    logits = apply_penalties(logits, request)
    if request.num_output_tokens < p.min_tokens:  # not allowed to stop yet
        banned = [t for t in request.eos_token_ids + p.stop_token_ids if t < logits.shape[0]]
        if banned:
            logits[banned] = float("-inf")
    return logits


def row_probs(logits: torch.Tensor, request: SamplingState) -> torch.Tensor:
    """The exact distribution `Sampler` draws one row's next token from (one-hot on the argmax when greedy):
    speculative decoding verifies against it, so it must be this one function."""
    return sampling_probs(processed_logits(logits.clone(), request), request.params)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs`. Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and the draw depends
    only on this request's own generator, so a seeded request samples the same tokens whatever batch it is in.
    The noise is drawn on the CPU so the same generator works whatever device the logits are on. A zero draw
    (possible in float32) would make 0 / 0 = NaN for an impossible token: floor it."""
    noise = torch.empty(probs.shape).exponential_(generator=generator).clamp_min_(_TINY)
    return int((probs / noise.to(probs.device)).argmax())
