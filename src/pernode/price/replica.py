"""One continuously batching replica as the fleet simulator steps it: the engine's own scheduler, with a step-time
model in place of the model runner.

As vidur (Agrawal et al., arXiv 2405.05465) drives its replica schedulers with a time predictor, each simulated
replica owns a real `serve.engine.scheduler.Scheduler` over a real `KVCacheManager` (block pool, prefix cache) and
feeds it requests of the right token counts. So token budget, chunked prefill (Sarathi-Serve, arXiv 2403.02310),
FIFO admission, recompute preemption and prefix caching are the engine's code, not a copy of it: the simulator and
the engine cannot disagree on who runs in which step. Only the forward pass is replaced, by StepTimeModel: a step
with b decodes and prompt chunks lasts decode_step_s(b) + sum(chunk tokens x seconds per token of that prompt),
the engine's part scaled by the measured mixed-step factor when the step holds both and the model was built with
mixed steps (off by default).

Speed: when a step only decodes and nothing waiting can be admitted, the scheduler would repeat it, one token per
request, until the earliest request finishes, the KV pool runs short, or (when admission is open) a request
arrives. Such a run is one event: its steps are applied at once with the same KV allocations (block counts) the
step-by-step engine makes, and it is cut short at the next step boundary after an arrival.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pernode.config import DEFAULT_BLOCK_SIZE
from pernode.price.node_speed import NodeSpeed
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace
from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pernode.serve.sampling.params import SamplingParams

_SIM_PARAMS = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
_OUTPUT_TOKEN = 0  # what a simulated request "samples": only counts matter, except to the prefix cache


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica can do: its step times, its batch cap (max_num_seqs), its KV cache and its per-step token
    budget (max_num_batched_tokens), as the engine is configured."""

    step_model: StepTimeModel
    max_batch: int
    kv_max_tokens: int
    token_budget: int = 2048  # vLLM's default max_num_batched_tokens with chunked prefill
    block_size: int = DEFAULT_BLOCK_SIZE
    enable_prefix_caching: bool = True  # effective only for traces that carry token ids
    node_speed: NodeSpeed | None = None  # the engine's speed against the step model over time; None: as profiled

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch!r}: must be >= 1")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r}: must be >= 1")
        if self.kv_max_tokens < self.block_size:
            raise ValueError(f"kv_max_tokens={self.kv_max_tokens!r}: must be >= block_size = {self.block_size}")
        if self.token_budget < 2:
            raise ValueError(f"token_budget={self.token_budget!r}: must be >= 2 tokens per step")
        if self.max_batch >= self.token_budget:
            raise ValueError(f"max_batch={self.max_batch}: must be < token_budget = {self.token_budget}, since "
                             f"decodes take one budget token each and prompts need at least one left")

    @property
    def num_blocks(self) -> int:
        return self.kv_max_tokens // self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class SimRequest(Request):
    """An engine request with the simulator's bookkeeping: its trace index, its output length and the seconds per
    token of its current (re)prefill, since a recompute after preemption is longer than the prompt."""

    def __init__(self, rid: int, prompt_token_ids: list[int], output_tokens: int, s_per_token: float):
        super().__init__(str(rid), prompt_token_ids, _SIM_PARAMS, [])
        self.rid = rid
        self.target_output_tokens = output_tokens
        self.s_per_token = s_per_token
        self.decoding = False  # sampled since its last (re)admission: its steps are decodes, not prompt chunks


class RequestBook:
    """Per-request facts and timestamps shared by every replica of one run (Python lists: fast to index)."""

    def __init__(self, trace: RequestTrace, step_model: StepTimeModel) -> None:
        n = len(trace)
        self.prompt: list[int] = trace.prompt_tokens.tolist()
        self.output: list[int] = trace.output_tokens.tolist()
        self.prompt_token_ids: Sequence[Sequence[int]] | None = trace.prompt_token_ids
        self.spt: list[float] = np.asarray(
            step_model.prefill_s_per_token(trace.prompt_tokens.astype(np.float64))).tolist()
        self.preemptions = [0] * n
        self.admit_s = [math.nan] * n  # first admission
        self.first_token_s = [math.nan] * n
        self.finish_s = [math.nan] * n
        self.replica = [0] * n

    def make_request(self, rid: int) -> SimRequest:
        """The engine request for trace row `rid`: its own token ids when the trace has them, else ids no other
        request shares (a unique first token), so the prefix cache never hits by accident."""
        if self.prompt_token_ids is not None:
            ids = list(self.prompt_token_ids[rid])
        else:
            ids = [rid + 1] + [_OUTPUT_TOKEN] * (self.prompt[rid] - 1)
        return SimRequest(rid, ids, self.output[rid], self.spt[rid])


class Replica:
    """One replica: the engine's scheduler and KV cache, stepped by `start_run` / `end_run`, fed by `arrive`."""

    def __init__(self, config: ReplicaConfig, book: RequestBook, schedule_log: list | None = None) -> None:
        self.config = config
        self.book = book
        self.step_model = config.step_model
        self.speed = config.node_speed
        self.decode_s = [config.step_model.decode_step_s(b) for b in range(config.max_batch + 1)]
        self.engine_decode_s = [config.step_model.engine_decode_step_s(b) for b in range(config.max_batch + 1)]
        prefix_caching = config.enable_prefix_caching and book.prompt_token_ids is not None
        self.kv = KVCacheManager(config.num_blocks, config.block_size, prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_batch,
                                                   max_num_batched_tokens=config.token_budget,
                                                   enable_chunked_prefill=True), self.kv)
        self.schedule_log = schedule_log  # when a list: (step start s, [(request, new tokens), ...]) per step
        self.busy = False
        self.batch = ScheduledBatch()
        self.run_start = 0.0
        self.run_step_s = 0.0
        self.run_steps = 0
        self.run_open_to_arrivals = False  # a decode-only run that an arrival could join at a step boundary
        self.version = 0  # bumped whenever the run's end changes, so a stale end event is ignored
        self.busy_s = 0.0
        self.steps = 0  # engine steps run, each step of a decode run counted
        self.slot_seconds = 0.0

    def arrive(self, rid: int, t: float) -> float | None:
        """Queue a request; returns the replica's new run end if the arrival started or shortened a run."""
        self.scheduler.add(self.book.make_request(rid))
        if not self.busy:
            return self.start_run(t, from_idle=True)
        if not self.run_open_to_arrivals:
            return None
        done = max(math.ceil((t - self.run_start) / self.run_step_s - 1e-9), 1)
        if done < self.run_steps:
            self.run_steps = done
            self.version += 1
            return self.run_start + self.run_step_s * done
        return None

    def start_run(self, t: float, from_idle: bool = False) -> float | None:
        """Let the scheduler pick the next step (or run of identical decode steps); returns its end time, None
        when there is nothing to run. A step that starts on an idle replica (`from_idle`) also pays the step
        model's `idle_start_s`: the profile times its steps back to back, warm."""
        book = self.book
        batch = self.scheduler.schedule()
        for victim in batch.preempted:
            book.preemptions[victim.rid] += 1
            # The recompute covers the prompt and every token sampled so far, at the rate of a prompt that long.
            victim.s_per_token = float(self.step_model.prefill_s_per_token(victim.num_tokens))
            victim.decoding = False
        if not batch:
            self.busy, self.batch = False, batch
            return None
        decodes, prefill_s, prompt_tokens, admitted = 0, 0.0, 0, 0
        for request, n in zip(batch.requests, batch.num_new_tokens):
            if request.decoding:
                decodes += 1
                continue
            prefill_s += n * request.s_per_token
            prompt_tokens += n
            if math.isnan(book.admit_s[request.rid]):
                book.admit_s[request.rid] = t
                admitted += 1
        steps = 1
        open_to_arrivals = False
        if decodes == len(batch.requests) and not batch.preempted:
            # Nothing was admitted: either nothing waits (an arrival may join at a step boundary, unless the batch
            # is full) or the queue's head does not fit, and it will not while decodes only take blocks.
            steps = self._decode_run_steps(batch.requests)
            open_to_arrivals = not self.scheduler.waiting and decodes < self.config.max_batch
        self.busy, self.batch = True, batch
        decode_x, prefill_x = self.speed.at(t) if self.speed else (1.0, 1.0)
        engine_decode_s, prefill_s = self.engine_decode_s[decodes], prefill_s * prefill_x
        step_s = self.decode_s[decodes] + prefill_s
        if decode_x != 1.0:  # the engine's part only: the serving path's share was measured apart
            step_s += (decode_x - 1.0) * engine_decode_s
            engine_decode_s *= decode_x
        if decodes and prompt_tokens:
            mix = self.step_model.mix_factor(decodes, prompt_tokens)
            step_s += (mix - 1.0) * (engine_decode_s + prefill_s)
        change_s = self.speed.next_change_s(t) if steps > 1 and self.speed else math.inf
        if change_s < math.inf:  # a run of identical steps ends where the node's speed changes
            steps = min(steps, max(1, math.ceil((change_s - t) / step_s - 1e-9)))
        # the serving path's per-request work (parsing, tokenizing, first and last chunks) on the engine's core
        step_s += admitted * getattr(self.step_model, "serving_admit_s", 0.0)
        if from_idle:  # its own first step: a run of identical steps would spread it over every step
            steps = 1
            step_s += getattr(self.step_model, "idle_start_s", 0.0)
        self.run_start, self.run_step_s, self.run_steps = t, step_s, steps
        self.run_open_to_arrivals = open_to_arrivals
        self.version += 1
        return t + self.run_step_s * steps

    def _decode_run_steps(self, running: list[SimRequest]) -> int:
        """How many identical decode steps follow from here: until the earliest request samples its last token,
        and no further than the free blocks allow (the first step's blocks are already allocated)."""
        longest = min(r.target_output_tokens - r.num_output_tokens for r in running)
        if longest <= 1:
            return 1
        bs, free = self.config.block_size, self.kv.pool.num_free
        base = [(r.num_computed_tokens, len(r.block_ids)) for r in running]

        def extra_blocks(k: int) -> int:  # blocks k steps need beyond those already held
            return sum(max(0, -(-(c + k) // bs) - held) for c, held in base)

        lo, hi = 1, longest  # lo always fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra_blocks(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def end_run(self, t: float) -> int:
        """Apply the run that ends at t as the engine's step update does: computed tokens advance, full blocks
        enter the prefix cache, caught-up requests sample a token. Returns the requests finished."""
        book, kv, steps = self.book, self.kv, self.run_steps
        duration = self.run_step_s * steps
        self.busy_s += duration
        self.steps += steps
        self.slot_seconds += len(self.scheduler.running) * duration
        batch = self.batch
        if self.schedule_log is not None:
            step = [(r.rid, n) for r, n in zip(batch.requests, batch.num_new_tokens)]
            self.schedule_log.extend((self.run_start + j * self.run_step_s, step) for j in range(steps))
        finished = 0
        bs = self.config.block_size
        filler = [_OUTPUT_TOKEN] * (steps - 1)
        for request, n in zip(batch.requests, batch.num_new_tokens):
            if steps > 1:  # a decode run: the same blocks, in count, as `steps` single-token allocations
                if -(-(request.num_computed_tokens + steps) // bs) > len(request.block_ids) and not kv.allocate(
                        request, steps):
                    raise RuntimeError("simulator bug: a decode run outgrew the free KV blocks it was sized for")
                request.all_token_ids += filler
                request.output_token_ids += filler
                n = steps
            request.num_computed_tokens += n
            kv.cache_computed_blocks(request)
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prompt chunk
            request.append_token(_OUTPUT_TOKEN)
            request.decoding = True
            rid = request.rid
            if math.isnan(book.first_token_s[rid]):
                book.first_token_s[rid] = t
            if request.num_output_tokens >= request.target_output_tokens:
                book.finish_s[rid] = t
                self.scheduler.finish(request)
                finished += 1
        return finished
