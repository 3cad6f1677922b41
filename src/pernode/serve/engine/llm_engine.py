"""The engine loop: `add_request`, `step`, `abort_request`. Each step schedules, runs one forward, samples,
and returns per-request deltas, so a server can stream and an offline driver can just loop."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pernode.config import EngineConfig
from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.model_runner import ModelRunner
from pernode.serve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from pernode.serve.engine.request import Request, RequestStatus
from pernode.serve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pernode.serve.engine.step_timer import decode_step_times_s
from pernode.serve.models.loader import build_model
from pernode.serve.models.registry import resolve_model
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.sampler import Sampler
from pernode.serve.tokenizer import IncrementalDetokenizer

log = logging.getLogger("pernode.serve.engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not supported: allowed {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


class _Sample:
    """Per-sample text state: detokenizer, stop-string search, what has been streamed already."""

    def __init__(self, request: Request, tokenizer):
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                            skip_special_tokens=request.params.skip_special_tokens)
        self.text = ""
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.num_emitted_logprobs = 0
        self.stop_holdback = max((len(s) for s in request.params.stop), default=1) - 1


class _Group:
    """One user request: its n samples share the prompt (later samples start once the first has cached it)."""

    def __init__(self, request_id: str, prompt: str | None, samples: list[_Sample]):
        self.request_id = request_id
        self.prompt = prompt
        self.samples = samples
        self.pending: list[Request] = []  # samples waiting for the first one's prompt blocks


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown engine option {key!r}")
            setattr(config, key, value)
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)

        source = resolve_model(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} is out of range: allowed >= 2")

        started = time.perf_counter()
        self.model = build_model(source, self.device, self.dtype, max_positions=self.max_model_len)
        self.load_time_s = time.perf_counter() - started

        block_size = config.block_size
        if not 1 <= block_size <= 256:
            raise ValueError(f"block_size={block_size} is out of range: allowed 1..256")
        self.kv_bytes_per_token = self.model_config.kv_bytes_per_token(self.dtype.itemsize)
        num_blocks = config.num_blocks or self._default_num_blocks(block_size)
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is out of range: allowed >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv = KVCacheManager(num_blocks, block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.device, self.dtype)
        max_batched = config.max_num_batched_tokens or (512 if self.device.type == "cpu" else 4096)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
            max_model_len=self.max_model_len, enable_chunked_prefill=config.enable_chunked_prefill), self.kv)
        self.sampler = Sampler()

        self.groups: dict[str, _Group] = {}
        self.requests: dict[str, Request] = {}  # sample request id -> request
        self._pending_outputs: list[RequestOutput] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        log.info("model %s (%s) on %s in %s, loaded in %.1f s", self.model_config.name, source.format,
                 self.device, str(self.dtype).removeprefix("torch."), self.load_time_s)
        log.info("KV cache: %d bytes/token, %d blocks of %d tokens (%.2f GiB) = %d tokens; max concurrent "
                 "sequences of max_model_len=%d: %.2f", self.kv_bytes_per_token, num_blocks, block_size,
                 self.kv_cache_bytes / 2**30, num_blocks * block_size, self.max_model_len,
                 self.max_concurrent_seqs)

    # ---- capacity ---------------------------------------------------------------------------------------
    def _default_num_blocks(self, block_size: int) -> int:
        kv_bytes = self.config.kv_cache_bytes
        if kv_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_bytes = free // 2
            else:
                kv_bytes = 2 * 2**30
        blocks = kv_bytes // (self.kv_bytes_per_token * block_size)
        if blocks < 1:
            raise ValueError(f"kv_cache_bytes={kv_bytes} is too small: one block of {block_size} tokens needs "
                             f"{self.kv_bytes_per_token * block_size} bytes")
        return int(blocks)

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    @property
    def max_concurrent_seqs(self) -> float:
        return self.num_blocks / self.kv.blocks_needed(self.max_model_len)

    # ---- requests ---------------------------------------------------------------------------------------
    def validate_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token id")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]!r} is out of range: allowed integers in [0, {vocab})")
        if not token_ids:
            raise ValueError("prompt is empty: give at least one character or token id")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; max_model_len is {self.max_model_len}: allowed at most "
                             f"{self.max_model_len - 1} prompt tokens")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} "
                             f"exceeds max_model_len ({self.max_model_len}): allowed max_tokens <= "
                             f"{self.max_model_len - n}")
        need = self.kv.blocks_needed(n + (params.max_tokens or self.max_model_len - n))
        if need > self.num_blocks:
            raise ValueError(f"this request alone needs {need} KV blocks but the cache has {self.num_blocks}: "
                             f"lower max_tokens or enlarge the cache (--kv-cache-bytes / --num-blocks)")
        return token_ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_s: float | None = None) -> list[int]:
        """Queue a request; raises ValueError for invalid input without touching any other request.
        Returns the prompt's token ids."""
        params = params or SamplingParams()
        params.validate()
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.validate_prompt(prompt, params)
        eos = self.model_config.eos_token_ids
        samples = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(sub_id, token_ids, params, eos, index=i, seed=seed, group_id=request_id)
            if arrival_s is not None:
                req.times.arrival_s = arrival_s
            samples.append(_Sample(req, self.tokenizer))
        group = _Group(request_id, prompt if isinstance(prompt, str) else None, samples)
        self.groups[request_id] = group
        for s in samples:
            self.requests[s.request.request_id] = s.request
        first, rest = samples[0].request, [s.request for s in samples[1:]]
        self.scheduler.add(first)
        if self.kv.enable_prefix_caching and len(token_ids) > self.block_size:
            group.pending = rest
        else:
            for r in rest:
                self.scheduler.add(r)
        return token_ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next `step` reports it with finish_reason 'abort'."""
        group = self.groups.get(request_id)
        if group is None:
            return
        for s in group.samples:
            if not s.request.is_finished:
                if s.request in group.pending:
                    s.request.status = RequestStatus.FINISHED
                else:
                    self.scheduler.finish(s.request)
                s.request.finish_reason = "abort"
                s.request.times.finished_s = time.monotonic()
        group.pending = []
        self._pending_outputs.append(self._group_output(group))
        self._forget(group)

    def time_decode_steps(self, batch_size: int, context_len: int, num_steps: int, seed: int = 0
                          ) -> list[float] | None:
        """Seconds of each of `num_steps` synthetic decode steps of `batch_size` sequences at `context_len` on the
        idle engine (the profiler's probe); None when the KV cache cannot hold them."""
        g = torch.Generator().manual_seed(seed)
        return decode_step_times_s(self.kv, self.runner, self.sampler, self.model_config.vocab_size, batch_size,
                                   context_len, num_steps, g)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or bool(self._pending_outputs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- the loop ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        now = time.monotonic()
        for r in batch.requests:
            if r.times.first_scheduled_s is None:
                r.times.first_scheduled_s = now
                self.prompt_tokens_total += r.num_prompt_tokens
        try:
            logits, sampling = self.runner.execute(batch)
            result = self.sampler(logits, sampling)
        except Exception as exc:  # one bad step fails its own requests; the engine keeps serving others
            log.exception("engine step failed; failing its %d requests", len(batch.requests))
            return outputs + self._fail(batch, f"{type(exc).__name__}: {exc}")
        return outputs + self._postprocess(batch, sampling, result)

    def _postprocess(self, batch: ScheduledBatch, sampling: list[Request], result) -> list[RequestOutput]:
        now = time.monotonic()
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
            self.kv.cache_computed_blocks(request)
        touched: dict[str, _Group] = {}
        for i, request in enumerate(sampling):
            group = self.groups[request.group_id]
            sample = group.samples[request.index]
            self._accept_token(sample, result.token_ids[i], result.logprobs[i], result.top_logprobs[i], now)
            touched[group.request_id] = group
        # Samples 2..n start once the first sample's prompt blocks are cached.
        for request in batch.requests:
            group = self.groups.get(request.group_id)
            if group and group.pending and request.index == 0 and request.num_computed_tokens >= request.num_prompt_tokens:
                for r in group.pending:
                    self.scheduler.add(r)
                group.pending = []
        outputs = []
        for group in touched.values():
            outputs.append(self._group_output(group))
            if all(s.request.is_finished for s in group.samples):
                self._forget(group)
        return outputs

    def _accept_token(self, sample: _Sample, token_id: int, logprob, top, now: float) -> None:
        request = sample.request
        p = request.params
        request.append_token(token_id)
        self.generation_tokens_total += 1
        if request.times.first_token_s is None:
            request.times.first_token_s = now
        request.times.last_token_s = now
        if logprob is not None:
            request.cumulative_logprob += logprob
        if request.logprobs is not None:
            tok = self.tokenizer.token_to_str
            request.logprobs.append(TokenLogprob(token_id, tok(token_id), logprob,
                                                 [(t, tok(t), lp) for t, lp in (top or [])]))

        finish, stop_reason = None, None
        past_min = request.num_output_tokens >= p.min_tokens
        if past_min and token_id in request.eos_token_ids:
            finish = "stop"
        elif past_min and token_id in p.stop_token_ids:
            finish, stop_reason = "stop", token_id
        else:
            before = len(sample.text)
            sample.text += sample.detok.push([token_id])
            if p.stop and past_min:
                start = max(0, before - sample.stop_holdback)
                hits = [(idx, s) for s in p.stop if (idx := sample.text.find(s, start)) >= 0]
                if hits:
                    idx, s = min(hits)
                    sample.text = sample.text[:idx]
                    finish, stop_reason = "stop", s
        if finish is None:
            if p.max_tokens is not None and request.num_output_tokens >= p.max_tokens:
                finish = "length"
            elif request.num_tokens >= self.max_model_len:
                finish = "length"
        if finish is not None:
            request.finish_reason, request.stop_reason = finish, stop_reason
            request.times.finished_s = now
            self.scheduler.finish(request)

    def _fail(self, batch: ScheduledBatch, message: str) -> list[RequestOutput]:
        failed: dict[str, _Group] = {}
        for request in batch.requests:
            group = self.groups.get(request.group_id)
            if group is not None:
                failed[group.request_id] = group
        outputs = []
        for group in failed.values():
            for s in group.samples:
                if not s.request.is_finished:
                    if s.request in group.pending:
                        s.request.status = RequestStatus.FINISHED
                    else:
                        self.scheduler.finish(s.request)
                    s.request.finish_reason = "error"
            group.pending = []
            out = self._group_output(group)
            out.error = message
            outputs.append(out)
            self._forget(group)
        return outputs

    def _forget(self, group: _Group) -> None:
        self.groups.pop(group.request_id, None)
        for s in group.samples:
            self.requests.pop(s.request.request_id, None)

    def _group_output(self, group: _Group) -> RequestOutput:
        outs = []
        for s in group.samples:
            r = s.request
            # hold back a possible stop-string prefix until it is decided
            visible = len(s.text) if r.is_finished else max(s.num_emitted_chars, len(s.text) - s.stop_holdback)
            delta_text = s.text[s.num_emitted_chars:visible]
            delta_ids = r.output_token_ids[s.num_emitted_tokens:]
            delta_lp = r.logprobs[s.num_emitted_logprobs:] if r.logprobs is not None else None
            s.num_emitted_chars, s.num_emitted_tokens = visible, r.num_output_tokens
            s.num_emitted_logprobs = len(r.logprobs) if r.logprobs is not None else 0
            outs.append(CompletionOutput(
                index=r.index, text=s.text[:visible], token_ids=r.output_token_ids, delta_text=delta_text,
                delta_token_ids=delta_ids, logprobs=r.logprobs, delta_logprobs=delta_lp,
                cumulative_logprob=r.cumulative_logprob, finish_reason=r.finish_reason, stop_reason=r.stop_reason))
        first = group.samples[0].request
        t = first.times
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=first.prompt_token_ids,
            outputs=outs, finished=all(s.request.is_finished for s in group.samples),
            num_cached_tokens=first.num_cached_tokens,
            metrics=RequestMetrics(t.arrival_s, t.first_scheduled_s, t.first_token_s, t.finished_s,
                                   sum(s.request.num_preemptions for s in group.samples)))

    # ---- observability ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting)
            + sum(len(g.pending) for g in self.groups.values()),
            kv_cache_usage=self.kv.usage(), num_blocks=self.num_blocks, num_free_blocks=self.kv.pool.num_free,
            prefix_cache_queries=self.kv.stats.queries_tokens, prefix_cache_hits=self.kv.stats.hits_tokens,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total)
