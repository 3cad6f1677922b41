"""What the engine hands back each step: per-request deltas for streaming, full text for batch use."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a sample ended; compares and serialises as OpenAI's strings ("stop" == FinishReason.STOP)."""

    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the caller aborted it (client gone, server draining)
    ERROR = "error"  # the engine failed while running it

    def __str__(self) -> str:
        return self.value


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob), best first


@dataclass
class CompletionOutput:
    """One sample of a request. `text`, `token_ids` and `logprobs` are the whole output so far; `token_ids` and
    `logprobs` are the engine's own lists (no copy per step), final once `finish_reason` is set. Streaming
    consumers read the `delta_*` fields."""

    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None  # set when logprobs were requested
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    finished_s: float | None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request failed inside the engine
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (it has no context)
    prompt_logprobs: list[TokenLogprob | None] | None = None
