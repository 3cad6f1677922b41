"""One continuously batching replica as the fleet simulator steps it: the engine's scheduling rule, event by event.

The rule is vLLM v1's (Kwon et al., arXiv 2309.06180; chunked prefill as in Sarathi-Serve, Agrawal et al., arXiv
2403.02310) and our engine's (serve/engine/scheduler.py): every step, each running decode gets one token, then
prompts fill what is left of the token budget, continuing a partly prefilled prompt first and admitting waiting
requests in arrival order while the batch has a slot and the KV cache has room for the prompt's next chunk. A request
holds KV for the tokens it has computed. When a step's tokens do not fit, the newest running request is preempted:
its KV is freed and it goes back to the head of the queue to recompute its prompt and the tokens it had produced;
nothing is admitted in that step. A step lasts StepTimeModel.step_s. KV is counted in tokens (a block size of 1).

Speed: a replica whose step only decodes, with no admissible request waiting, repeats the same step until its
earliest decode finishes or its KV fills. We schedule that whole run as one event, and cut it short at the next
step boundary if an admissible request arrives; decode progress is one per-replica counter, and each running request
waits in a heap keyed by the counter value at which it finishes. Events scale with requests, not with tokens.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica can do: its step times, its batch cap, its KV tokens and its per-step token budget."""

    step_model: StepTimeModel
    max_batch: int
    kv_max_tokens: int
    token_budget: int = 2048  # vLLM's default max_num_batched_tokens with chunked prefill

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch!r}: must be >= 1")
        if self.kv_max_tokens < 1:
            raise ValueError(f"kv_max_tokens={self.kv_max_tokens!r}: must be >= 1")
        if self.token_budget < 2:
            raise ValueError(f"token_budget={self.token_budget!r}: must be >= 2 tokens per step")
        if self.max_batch >= self.token_budget:
            raise ValueError(f"max_batch={self.max_batch}: must be < token_budget = {self.token_budget}, since "
                             f"decodes take one budget token each and prompts need at least one left")


class RequestBook:
    """Per-request facts and timestamps shared by every replica of one run (Python lists: fast to index)."""

    def __init__(self, trace: RequestTrace, step_model: StepTimeModel) -> None:
        n = len(trace)
        self.prompt: list[int] = trace.prompt_tokens.tolist()
        self.output: list[int] = trace.output_tokens.tolist()
        # Seconds per prompt token of the request's current (re)prefill; a recompute is longer than the prompt.
        self.spt: list[float] = np.asarray(
            step_model.prefill_s_per_token(trace.prompt_tokens.astype(np.float64))).tolist()
        self.sampled = [0] * n  # output tokens produced so far
        self.admitted_seq = [0] * n  # admission order: the newest running request is preempted first
        self.preemptions = [0] * n
        self.admit_s = [math.nan] * n  # first admission
        self.first_token_s = [math.nan] * n
        self.finish_s = [math.nan] * n
        self.replica = [0] * n


class Replica:
    """One replica's queues and KV, stepped by `start_run` / `end_run` and fed by `arrive`."""

    def __init__(self, config: ReplicaConfig, book: RequestBook) -> None:
        self.config = config
        self.book = book
        self.decode_s = [config.step_model.decode_step_s(b) for b in range(config.max_batch + 1)]
        self.waiting: deque[int] = deque()
        self.prefilling: deque[list[int]] = deque()  # [request id, tokens still to compute, tokens in all], FIFO
        self.decode_heap: list[tuple[int, int]] = []  # (counter value at which it finishes, request id)
        self.counter = 0  # decode tokens each running request has received since the replica started
        self.num_running = 0  # admitted and unfinished: prefilling + decoding
        self.num_admitted = 0
        # KV held: prefills hold what they computed; a decode holds prompt + sampled - 1 tokens, which is
        # kv_decode_base + counter summed over decodes (each adds prompt + output - 1 - its finish counter).
        self.kv_prefill = 0
        self.kv_decode_base = 0
        self.busy = False
        self.run_start = 0.0
        self.run_step_s = 0.0
        self.run_steps = 0
        self.run_chunks: list[tuple[list[int], int]] = []
        self.run_decodes = 0
        self.run_running = 0
        self.version = 0  # bumped whenever the run's end changes, so a stale end event is ignored
        self.busy_s = 0.0
        self.slot_seconds = 0.0

    @property
    def kv_used(self) -> int:
        return self.kv_prefill + self.kv_decode_base + len(self.decode_heap) * self.counter

    def arrive(self, rid: int, t: float) -> float | None:
        """Queue a request; returns the replica's new run end if the arrival started or shortened a run."""
        self.waiting.append(rid)
        if not self.busy:
            return self.start_run(t)
        if self.run_chunks or len(self.waiting) > 1 or self.num_running >= self.config.max_batch:
            return None
        # A decode-only run: could this request join at the first step boundary at or after t? The decodes take
        # one KV token each per step and the prompt's first chunk must fit beside them.
        done = max(math.ceil((t - self.run_start) / self.run_step_s - 1e-9), 1)
        b = self.run_decodes
        first_chunk = min(self.book.prompt[rid] + self.book.sampled[rid], self.config.token_budget - b)
        if done < self.run_steps and self.kv_used + (done + 1) * b + first_chunk <= self.config.kv_max_tokens:
            self.run_steps = done
            self.version += 1
            return self.run_start + self.run_step_s * done
        return None

    def start_run(self, t: float) -> float | None:
        """Schedule the next step (or run of identical decode steps); returns its end time, None when idle."""
        book, kv_max = self.book, self.config.kv_max_tokens
        b = len(self.decode_heap)
        budget = self.config.token_budget - b
        chunks: list[tuple[list[int], int]] = []
        chunk_tokens = 0
        for entry in self.prefilling:  # a partly computed prompt goes first, as running requests do in vLLM
            if budget <= 0:
                break
            take = entry[1] if entry[1] < budget else budget
            chunks.append((entry, take))
            budget -= take
            chunk_tokens += take
        preempted = self.kv_used + b + chunk_tokens > kv_max
        if preempted:
            b, chunks, chunk_tokens = self._preempt_newest_until_fits(b, chunks, chunk_tokens)
        else:
            while self.waiting and budget > 0 and self.num_running < self.config.max_batch:
                rid = self.waiting[0]
                length = book.prompt[rid] + book.sampled[rid]
                take = length if length < budget else budget
                if self.kv_used + b + chunk_tokens + take > kv_max:
                    break  # first come first served: the head blocks, as vLLM's FCFS policy does
                self.waiting.popleft()
                self.num_running += 1
                self.num_admitted += 1
                book.admitted_seq[rid] = self.num_admitted
                if math.isnan(book.admit_s[rid]):
                    book.admit_s[rid] = t
                entry = [rid, length, length]
                self.prefilling.append(entry)
                chunks.append((entry, take))
                budget -= take
                chunk_tokens += take
        if chunks:
            step_s = self.decode_s[b] + sum(take * book.spt[entry[0]] for entry, take in chunks)
            steps = 1
        elif b:
            step_s = self.decode_s[b]
            # Until the earliest decode finishes or the KV fills; after a preemption, one step, since the next
            # step may admit again.
            steps = 1 if preempted else min(self.decode_heap[0][0] - self.counter, (kv_max - self.kv_used) // b)
        else:
            self.busy = False
            return None
        self.busy = True
        self.run_start, self.run_step_s, self.run_steps = t, step_s, steps
        self.run_chunks, self.run_decodes, self.run_running = chunks, b, self.num_running
        self.version += 1
        return t + step_s * steps

    def _preempt_newest_until_fits(self, b: int, chunks: list[tuple[list[int], int]],
                                   chunk_tokens: int) -> tuple[int, list[tuple[list[int], int]], int]:
        """The engine's rule: while the step's new tokens do not fit, the newest running request frees its KV and
        goes back to the head of the queue. Prompts still prefilling are the newest (prompts finish in FIFO order),
        then decodes by admission order."""
        book, kv_max = self.book, self.config.kv_max_tokens
        need = self.kv_used + b + chunk_tokens
        chunked = {id(entry): take for entry, take in chunks}
        while need > kv_max and self.prefilling:
            entry = self.prefilling.pop()
            take = chunked.pop(id(entry), 0)
            held = entry[2] - entry[1]
            need -= held + take
            chunk_tokens -= take
            self.kv_prefill -= held
            self._requeue(entry[0])
        chunks = [(entry, take) for entry, take in chunks if id(entry) in chunked]
        if need > kv_max:
            newest_first = sorted(self.decode_heap, key=lambda e: -book.admitted_seq[e[1]])
            victims = set()
            for finish_at, rid in newest_first:
                if need <= kv_max:
                    break
                held = book.prompt[rid] + book.output[rid] - 1 - finish_at + self.counter
                need -= held + 1
                self.kv_decode_base -= held - self.counter
                book.sampled[rid] = book.output[rid] - (finish_at - self.counter)
                victims.add(rid)
                self._requeue(rid)
            self.decode_heap = [e for e in self.decode_heap if e[1] not in victims]
            heapq.heapify(self.decode_heap)
            b = len(self.decode_heap)
        return b, chunks, chunk_tokens

    def _requeue(self, rid: int) -> None:
        book = self.book
        self.num_running -= 1
        book.preemptions[rid] += 1
        self.waiting.appendleft(rid)  # victims leave newest first, so the oldest ends up at the head
        # The recompute covers the prompt and every token sampled so far; its rate is that of a prompt that long.
        book.spt[rid] = float(self.config.step_model.prefill_s_per_token(book.prompt[rid] + book.sampled[rid]))

    def end_run(self, t: float) -> int:
        """Apply the run that ends at t: decodes advance, prompt chunks are computed. Returns requests finished."""
        book = self.book
        duration = self.run_step_s * self.run_steps
        self.busy_s += duration
        self.slot_seconds += self.run_running * duration
        finished = 0
        if self.run_decodes:
            self.counter += self.run_steps
            heap = self.decode_heap
            while heap and heap[0][0] <= self.counter:
                finish_at, rid = heapq.heappop(heap)
                self.kv_decode_base -= book.prompt[rid] + book.output[rid] - 1 - finish_at
                book.sampled[rid] = book.output[rid]
                book.finish_s[rid] = t
                self.num_running -= 1
                finished += 1
        for entry, take in self.run_chunks:
            entry[1] -= take
            self.kv_prefill += take
            if entry[1]:
                continue
            rid = entry[0]
            self.prefilling.popleft()  # chunks are taken in FIFO order, so the finished ones lead
            self.kv_prefill -= entry[2]
            # The step that computes a prompt's last token samples an output token (the first, unless recomputing).
            book.sampled[rid] += 1
            if math.isnan(book.first_token_s[rid]):
                book.first_token_s[rid] = t
            if book.sampled[rid] == book.output[rid]:
                book.finish_s[rid] = t
                self.num_running -= 1
                finished += 1
            else:
                finish_at = self.counter + book.output[rid] - book.sampled[rid]
                self.kv_decode_base += book.prompt[rid] + book.output[rid] - 1 - finish_at
                heapq.heappush(self.decode_heap, (finish_at, rid))
        return finished
