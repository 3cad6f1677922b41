"""From sampled tokens to what users read: incremental detokenization, stop strings, logprobs, n-sample groups and
the `RequestOutput`s each step hands back (vLLM v1's output processor, in-process).

A stop string is cut from the text, and while streaming the text that could still begin one is held back until
it is decided, so a client never sees part of a stop string.
"""
from __future__ import annotations

from pernode.serve.engine.outputs import (CompletionOutput, FinishReason, RequestMetrics, RequestOutput,
                                          TokenLogprob)
from pernode.serve.engine.request import Request
from pernode.serve.tokenizer import IncrementalDetokenizer, Tokenizer


class SampleText:
    """One sample's text state: detokenizer, text so far, logprobs, and how much of each has been streamed."""

    def __init__(self, request: Request, tokenizer: Tokenizer):
        self.request = request
        params = request.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                                  skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        # the longest stop string less one character could still be completed by the next token
        self.stop_holdback = max((len(s) for s in params.stop), default=1) - 1
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.num_emitted_logprobs = 0

    def next_output(self) -> CompletionOutput:
        """The sample's output so far, with what is new since the last call as deltas."""
        r = self.request
        visible = len(self.text) if r.is_finished else max(self.num_emitted_chars, len(self.text) - self.stop_holdback)
        delta_text = self.text[self.num_emitted_chars:visible]
        delta_ids = r.output_token_ids[self.num_emitted_tokens:]
        delta_lp = self.logprobs[self.num_emitted_logprobs:] if self.logprobs is not None else None
        self.num_emitted_chars, self.num_emitted_tokens = visible, r.num_output_tokens
        self.num_emitted_logprobs = len(self.logprobs) if self.logprobs is not None else 0
        return CompletionOutput(
            index=r.index, text=self.text[:visible], token_ids=r.output_token_ids, delta_text=delta_text,
            delta_token_ids=delta_ids, logprobs=self.logprobs, delta_logprobs=delta_lp,
            cumulative_logprob=self.cumulative_logprob, finish_reason=r.finish_reason, stop_reason=r.stop_reason)


class RequestGroup:
    """One user request: the prompt and its n samples, reported together in one `RequestOutput`."""

    def __init__(self, request_id: str, prompt: str | None, samples: list[SampleText]):
        self.request_id = request_id
        self.prompt = prompt
        self.samples = samples

    @property
    def requests(self) -> list[Request]:
        return [s.request for s in self.samples]

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)

    def next_output(self, error: str | None = None) -> RequestOutput:
        first = self.samples[0].request
        t = first.times
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=first.prompt_token_ids,
            outputs=[s.next_output() for s in self.samples], finished=self.finished,
            num_cached_tokens=first.num_cached_tokens, error=error,
            metrics=RequestMetrics(t.arrival_s, t.first_scheduled_s, t.first_token_s, t.finished_s,
                                   sum(s.request.num_preemptions for s in self.samples)))


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self._samples: dict[str, SampleText] = {}  # sample request id -> its text state

    def add(self, request_id: str, prompt: str | None, requests: list[Request]) -> RequestGroup:
        samples = [SampleText(r, self.tokenizer) for r in requests]
        group = RequestGroup(request_id, prompt, samples)
        self.groups[request_id] = group
        for s in samples:
            self._samples[s.request.request_id] = s
        return group

    def remove(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        for s in group.samples:
            self._samples.pop(s.request.request_id, None)

    def token_str(self, token_id: int) -> str:
        """A token's text for logprobs; "" for an id of the model's padded vocabulary, which no token has (models
        round their vocabulary up past the tokenizer's: such ids can be ranked, even sampled, but not decoded)."""
        return self.tokenizer.token_to_str(token_id) if token_id < self.tokenizer.vocab_size else ""

    def process_token(self, request: Request, token_id: int, logprob: float | None,
                      top: list[tuple[int, float]] | None, finish: FinishReason | None) -> FinishReason | None:
        """Take the token just appended to `request`, which `check_stop` judged `finish`; returns the finish reason
        once stop strings are applied (a stop string sets `request.stop_reason` and wins over `length`)."""
        sample = self._samples[request.request_id]
        if logprob is not None:
            sample.cumulative_logprob += logprob
        if sample.logprobs is not None:
            tok = self.token_str
            sample.logprobs.append(TokenLogprob(token_id, tok(token_id), logprob,
                                                [(t, tok(t), lp) for t, lp in (top or [])]))
        if finish is FinishReason.STOP:  # eos or a stop token: its text is not part of the output
            return finish
        before = len(sample.text)
        sample.text += sample.detokenizer.push([token_id])
        params = request.params
        if params.stop and request.num_output_tokens >= params.min_tokens:
            start = max(0, before - sample.stop_holdback)
            hits = [(idx, s) for s in params.stop if (idx := sample.text.find(s, start)) >= 0]
            if hits:
                idx, s = min(hits)
                sample.text = sample.text[:idx]
                request.stop_reason = s
                return FinishReason.STOP
        return finish
