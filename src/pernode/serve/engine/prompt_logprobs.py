"""Log-probabilities of the prompt's own tokens (vLLM's `prompt_logprobs`, what lm-eval's log-likelihood scoring
reads): the logits at position p score prompt token p + 1; the first prompt token has none.

They are gathered chunk by chunk as the prompt is prefilled, and only once per request: a recompute after
preemption adds nothing. Such requests take no prefix-cache hits (see `KVCacheManager.find_cached_prefix`), since
a cached position would have no logits.
"""
from __future__ import annotations

import torch

from pernode.serve.engine.outputs import TokenLogprob
from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch


class PromptLogprobs:
    def __init__(self, token_str):
        self._token_str = token_str  # token id -> its text
        self._collected: dict[str, list[TokenLogprob | None]] = {}  # request id -> one entry per prompt token

    def add(self, request: Request) -> None:
        if request.params.prompt_logprobs is not None and request.index == 0:
            self._collected[request.request_id] = [None]

    def get(self, request: Request) -> list[TokenLogprob | None] | None:
        return self._collected.get(request.request_id)

    def remove(self, request: Request) -> None:
        self._collected.pop(request.request_id, None)

    def positions(self, batch: ScheduledBatch) -> dict[str, range]:
        """Per request still missing some: the positions of this step whose logits score a prompt token."""
        wanted = {}
        for request, n in zip(batch.requests, batch.num_new_tokens):
            collected = self._collected.get(request.request_id)
            if collected is None or len(collected) >= request.num_prompt_tokens:
                continue
            # next missing entry is prompt token len(collected), scored at position len(collected) - 1
            start = max(request.num_computed_tokens, len(collected) - 1)
            stop = min(request.num_computed_tokens + n, request.num_prompt_tokens - 1)
            if stop > start:
                wanted[request.request_id] = range(start, stop)
        return wanted

    def record(self, requests: dict[str, Request], logits: dict[str, torch.Tensor]) -> None:
        """Logits [len(positions), vocab] per request, from `positions` of the same step, in order."""
        for request_id, rows in logits.items():
            request = requests[request_id]
            collected = self._collected[request_id]
            first = len(collected)
            targets = request.prompt_token_ids[first:first + rows.shape[0]]
            logprobs = torch.log_softmax(rows.float(), dim=-1)
            chosen = logprobs.gather(1, torch.tensor(targets, device=rows.device)[:, None]).squeeze(1).tolist()
            k = request.params.prompt_logprobs
            top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
            for j, token_id in enumerate(targets):
                top = ([(t, self._token_str(t), v) for t, v in zip(top_ids[j].tolist(), top_vals[j].tolist())]
                       if k else [])
                collected.append(TokenLogprob(token_id, self._token_str(token_id), chosen[j], top))
