"""Iteration-level scheduling with one rule: every step, each request catches up on its uncomputed tokens
under a shared token budget. Prefill, chunked prefill, decode and recompute after preemption are all that rule.

Continuous batching from Orca (Yu et al., OSDI 2022); the request-centric form follows vLLM's v1 scheduler.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens

        # Running requests first, oldest first: they hold blocks and their users are waiting on tokens.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = request.num_tokens - request.num_computed_tokens
            if request.spec_token_ids:  # proposed tokens spend the budget like any others; what does not fit waits
                del request.spec_token_ids[max(0, budget - num_new):]
                num_new += len(request.spec_token_ids)
            num_new = min(num_new, budget)
            while not self.kv.allocate(request, num_new):
                if request.spec_token_ids:  # speculation never costs another request its blocks
                    num_new -= len(request.spec_token_ids)
                    request.spec_token_ids = []
                    continue
                victim = self.running.pop()  # the newest request gives its blocks back
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                batch.requests.append(request)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: everything after it is gone too

        # Admit waiting requests in FIFO order, unless this step had to preempt (memory is tight).
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.kv.block_size
            remaining = request.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget)
            if not self.kv.allocate(request, num_new, cached):
                break
            self.waiting.popleft()
            if request.num_computed_tokens == 0:  # a real lookup this step, not a chunk continuing
                self.kv.record_prefix_query(request, num_cached)
            if request.times.first_scheduled_s is None:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the K/V, keep the tokens, go back to the head of the queue."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request from whichever queue holds it and free its blocks at once."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
