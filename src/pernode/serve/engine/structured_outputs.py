"""The engine's side of constrained decoding: a grammar matcher per sample, each step's masks started before the
forward pass (so they overlap it), and every sampled token fed back to its matcher.

A sample whose grammar is complete finishes with `stop`, even under `ignore_eos` or `min_tokens`: nothing else
may follow. Speculative decoding uses `GrammarMatcher.accept_proposed` and `rollback` on `matcher(request)`.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future

from pernode.serve.engine.outputs import FinishReason
from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch
from pernode.serve.sampling.structured.grammar import GrammarCompiler, GrammarMatcher
from pernode.serve.sampling.structured.spec import StructuredOutputs
from pernode.serve.sampling.structured.token_masks import MaskWorker, TokenMasks
from pernode.serve.tokenizer import Tokenizer

log = logging.getLogger("pernode.serve.engine")


def sampling_requests(batch: ScheduledBatch) -> list[Request]:
    """The requests that sample a token this step (caught up with their tokens, and with their proposed tokens when
    speculating), in the runner's order."""
    return [r for r, n in zip(batch.requests, batch.num_new_tokens)
            if r.num_computed_tokens + n == r.num_tokens + len(r.spec_token_ids)]


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int]):
        self.compiler = GrammarCompiler(tokenizer, eos_token_ids)
        self._matchers: dict[str, GrammarMatcher] = {}  # sample request id -> its matcher
        self._worker: MaskWorker | None = None

    def validate(self, spec: StructuredOutputs) -> None:
        """ValueError naming the field when the grammar cannot be compiled (callable from any thread)."""
        self.compiler.validate(spec)

    def add(self, requests: list[Request]) -> None:
        """One matcher per sample (raises ValueError, adding none, for a bad grammar)."""
        spec = requests[0].params.structured_outputs
        if spec is None:
            return
        matchers = self.compiler.matchers(spec, len(requests))
        for request, matcher in zip(requests, matchers):
            self._matchers[request.request_id] = matcher

    def matcher(self, request: Request) -> GrammarMatcher | None:
        return self._matchers.get(request.request_id)

    def remove(self, request: Request) -> None:
        self._matchers.pop(request.request_id, None)

    def start_masks(self, batch: ScheduledBatch) -> Future[TokenMasks] | None:
        """Begin this step's masks on the worker thread; None when no sampling request is constrained."""
        if not self._matchers:
            return None
        rows, matchers = [], []
        for row, request in enumerate(sampling_requests(batch)):
            matcher = self._matchers.get(request.request_id)
            if matcher is not None:
                rows.append(row)
                matchers.append(matcher)
        if not rows:
            return None
        if self._worker is None:
            self._worker = MaskWorker(self.compiler.vocab_size)
        return self._worker.submit(rows, matchers)

    def accept(self, request: Request, token_id: int) -> FinishReason | None:
        """Feed a sampled token to the request's matcher; STOP once the grammar is complete (or cannot go on)."""
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            return None
        if not matcher.accept_token(token_id):
            # only when another constraint (allowed_token_ids, logit_bias -100) left no grammatical token
            log.warning("request %s: token %d is outside its grammar (%s); stopping it", request.request_id,
                        token_id, matcher.error)
            return FinishReason.STOP
        return FinishReason.STOP if matcher.is_terminated else None
