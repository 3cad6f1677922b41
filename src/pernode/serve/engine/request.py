"""A request's state inside the engine: its tokens, how many of them have K/V in the cache, and its blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pernode.serve.engine.outputs import FinishReason
from pernode.serve.sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestTimes:
    arrival_s: float = field(default_factory=time.monotonic)
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None


class Request:
    """One sequence being generated. `num_computed_tokens` is the only progress counter: the scheduler's job is
    to bring it up to `num_tokens`, whether the gap is a prompt, a chunk of one, a recompute after preemption
    or a single decode token."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], index: int = 0, seed: int | None = None,
                 group_id: str | None = None):
        self.request_id = request_id
        self.group_id = group_id or request_id  # the user's request this sample belongs to
        self.index = index  # which of the parent's n samples this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = [] if params.ignore_eos else list(eos_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.block_ids: list[int] = []
        self.spec_token_ids: list[int] = []  # proposed next tokens, verified in the next step (speculative decoding)
        self.num_hashed_blocks = 0  # leading blocks already registered in the prefix cache
        self.block_hashes: list[bytes] = []  # prefix-cache key of each full block of all_token_ids, lazily
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.times = RequestTimes()
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")
