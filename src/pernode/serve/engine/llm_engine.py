"""The engine loop: `add_request`, `step`, `abort_request`. Each step schedules, runs one forward, samples, and
updates each request (stop rules in `stop_checker`, text and outputs in `output_processor`), returning per-request
deltas, so a server can stream and an offline driver can just loop."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pernode.config import DTYPE_NAMES, EngineConfig
from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.kv_cache_sizing import num_kv_blocks
from pernode.serve.engine.model_runner import ModelRunner
from pernode.serve.engine.output_processor import OutputProcessor, RequestGroup
from pernode.serve.engine.outputs import FinishReason, RequestOutput
from pernode.serve.engine.precision import describe_precision
from pernode.serve.engine.prompt_logprobs import PromptLogprobs
from pernode.serve.engine.prompt_validation import PromptValidator
from pernode.serve.engine.request import Request, RequestStatus
from pernode.serve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pernode.serve.engine.spec_decode import SpecDecodeStats, Speculator
from pernode.serve.engine.spec_decode.draft_proposer import draft_kv_bytes_per_token
from pernode.serve.engine.step_timer import decode_step_times_s, mixed_step_times_s
from pernode.serve.engine.step_clock import StepShape, step_shape
from pernode.serve.engine.stop_checker import check_stop
from pernode.serve.engine.structured_outputs import StructuredOutputManager
from pernode.serve.kernels.cpu_features import computes_bf16_natively
from pernode.serve.kernels.kv_quant import check_kv_cache_dtype, kv_bytes_per_token, resolve_kv_cache_dtype
from pernode.serve.engine.threads import apply_thread_plan, plan_threads
from pernode.serve.models.compiled import compile_model, warm_up
from pernode.serve.models.loader import build_model
from pernode.serve.models.registry import resolve_model
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.sampler import SampleResult, Sampler

log = logging.getLogger("pernode.serve.engine")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The engine's dtype: `name` (see config.DTYPE_NAMES), by default bf16 on CUDA and on CPUs that compute it
    natively (AVX512_BF16, AMX: detected at run time), fp32 on other CPUs."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" or computes_bf16_natively() else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r} is not supported: allowed {', '.join(sorted(DTYPE_NAMES))}")
    return getattr(torch, DTYPE_NAMES[name])


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
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding on


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown engine option {key!r}")
            setattr(config, key, value)
        config.validate()
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.thread_plan = plan_threads(config.num_threads, self.device)
        apply_thread_plan(self.thread_plan)
        self.dtype = resolve_dtype(config.dtype, self.device)
        check_kv_cache_dtype(config.kv_cache_dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)

        source = resolve_model(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} is out of range: allowed >= 2")

        started = time.perf_counter()
        self.gguf_weights = config.gguf_weights or ("native" if self.device.type == "cpu" else "float")
        self.model = build_model(source, self.device, self.dtype, max_positions=self.max_model_len,
                                 gguf_weights=self.gguf_weights)
        self.load_time_s = time.perf_counter() - started

        self.block_size = config.block_size
        self.kv_bytes_per_token = kv_bytes_per_token(self.model_config, self.dtype.itemsize, self.kv_cache_dtype)
        # the draft's own K/V (same blocks as the target's) comes out of the same budget
        self.draft_kv_bytes_per_token = draft_kv_bytes_per_token(config.speculative, self.dtype.itemsize)
        self.num_blocks = num_kv_blocks(config, self.kv_bytes_per_token + self.draft_kv_bytes_per_token, self.device)
        self.kv = KVCacheManager(self.num_blocks, self.block_size, config.enable_prefix_caching,
                                 config.prefix_cache_salt)
        self.runner = ModelRunner(self.model, self.num_blocks, self.block_size, self.device, self.dtype,
                                  self.kv_cache_dtype)
        self.compile_time_s = None
        if config.compile:
            compile_model(self.model, self.device)
            self.compile_time_s = warm_up(self.model, self.runner.kv_caches, self.block_size, self.device)
            log.info("torch.compile warm-up (compiling, or loading from the cache) took %.1f s", self.compile_time_s)
        else:  # compiled layers fuse their own ops; eager decode steps run the stack as one C++ call
            self.model.use_fused_decoder()
        max_batched = config.max_num_batched_tokens or (512 if self.device.type == "cpu" else 4096)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
            enable_chunked_prefill=config.enable_chunked_prefill), self.kv)
        self.sampler = Sampler()
        self.speculator = None if config.speculative is None else Speculator.create(
            config.speculative, self.model_config, self.tokenizer, self.num_blocks, self.block_size, self.device,
            self.dtype, self.max_model_len, self.model.kernel_switch_rows(self.dtype), self.model)
        self._prompt_validator = PromptValidator(self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                                               self.kv)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured_outputs = StructuredOutputManager(
            self.tokenizer, list(dict.fromkeys(self.model_config.eos_token_ids + self.tokenizer.stop_token_ids)))
        self.prompt_logprobs = PromptLogprobs(self.output_processor.token_str)

        # samples 2..n of a group, held until the first sample's prompt blocks are cached
        self._held_samples: dict[str, list[Request]] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._last_shape: StepShape | None = None  # what the last step held (its step clock's records)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        log.info("model %s (%s) on %s in %s, loaded in %.1f s", self.model_config.name, source.format,
                 self.device, str(self.dtype).removeprefix("torch."), self.load_time_s)
        log.info("%s", describe_precision(self.dtype, config.dtype, self.device, source.format, self.gguf_weights))
        log.info("KV cache: %d bytes/token (%s), %d blocks of %d tokens (%.2f GiB) = %d tokens; max concurrent "
                 "sequences of max_model_len=%d: %.2f", self.kv_bytes_per_token, self.kv_cache_dtype, self.num_blocks,
                 self.block_size, self.kv_cache_bytes / 2**30, self.num_blocks * self.block_size,
                 self.max_model_len, self.max_concurrent_seqs)

    # ---- capacity ---------------------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * (self.kv_bytes_per_token + self.draft_kv_bytes_per_token)

    @property
    def max_concurrent_seqs(self) -> float:
        return self.num_blocks / self.kv.blocks_needed(self.max_model_len)

    def limit_max_model_len(self, max_model_len: int) -> None:
        """Lower the context length (a server fitting it to the KV cache at start); never above the built one."""
        if not 2 <= max_model_len <= self.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} is out of range: allowed 2..{self.max_model_len}")
        self.max_model_len = max_model_len
        self._prompt_validator.max_model_len = max_model_len

    # ---- requests ---------------------------------------------------------------------------------------
    def validate_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids; ValueError if it could never run here (read-only: callable from any thread)."""
        return self._prompt_validator(prompt, params)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_s: float | None = None) -> list[int]:
        """Queue a request; raises ValueError for invalid input without touching any other request.
        Returns the prompt's token ids."""
        params = params or SamplingParams()
        params.validate()
        if request_id in self.output_processor.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.validate_prompt(prompt, params)
        eos = self.model_config.eos_token_ids
        requests = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(sub_id, token_ids, params, eos, index=i, seed=seed, group_id=request_id)
            if arrival_s is not None:
                request.times.arrival_s = arrival_s
            requests.append(request)
        self.structured_outputs.add(requests)  # compiles the grammar: ValueError (nothing added) if it cannot
        self.prompt_logprobs.add(requests[0])
        self.output_processor.add(request_id, prompt if isinstance(prompt, str) else None, requests)
        first, rest = requests[0], requests[1:]
        self.scheduler.add(first)
        if rest and self.kv.enable_prefix_caching and len(token_ids) > self.block_size:
            self._held_samples[request_id] = rest
        else:
            for r in rest:
                self.scheduler.add(r)
        return token_ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next `step` reports it with finish_reason 'abort'."""
        group = self.output_processor.groups.get(request_id)
        if group is not None:
            self._finish_group(group, FinishReason.ABORT)
            self._pending_outputs.append(group.next_output())
            self._forget(group)

    def time_decode_steps(self, batch_size: int, context_len: int, num_steps: int, seed: int = 0
                          ) -> list[float] | None:
        """Seconds of each of `num_steps` synthetic decode steps of `batch_size` sequences at `context_len` on the
        idle engine (the profiler's probe); None when the KV cache cannot hold them."""
        g = torch.Generator().manual_seed(seed)
        return decode_step_times_s(self.kv, self.runner, self.sampler, self.model_config.vocab_size, batch_size,
                                   context_len, num_steps, g)

    def time_mixed_steps(self, batch_size: int, context_len: int, prompt_tokens: int, num_steps: int,
                         seed: int = 0) -> list[float] | None:
        """Seconds of each of `num_steps` synthetic steps of `batch_size` decodes at `context_len` plus one fresh
        `prompt_tokens`-token prompt chunk, on the idle engine (the profiler's probe); None when it does not fit."""
        g = torch.Generator().manual_seed(seed)
        return mixed_step_times_s(self.kv, self.runner, self.sampler, self.model_config.vocab_size, batch_size,
                                  context_len, prompt_tokens, num_steps, g)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.groups) or bool(self._pending_outputs)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes, as vLLM's reset_prefix_cache does; only between requests (False while any
        runs). A later prompt then prefills whole, as on a fresh engine: a prefix hit changes how many rows its
        prefill chunk has, and with them, where a kernel's blocking depends on the row count, the last bits of its
        K/V (ARCHITECTURE.md, speculative decoding)."""
        return not self.has_unfinished_requests() and self.kv.reset_prefix_cache()

    # ---- the loop: schedule, execute, update ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.kv, self.scheduler.config.max_num_batched_tokens,
                                    self.max_model_len)
        started = time.perf_counter()  # a speculative step's cost: scheduling to the tokens appended, all of it
        batch = self.scheduler.schedule()
        self._last_shape = step_shape(batch) if batch else None
        if not batch:
            return outputs
        now = time.monotonic()
        for r in batch.requests:
            if r.times.first_scheduled_s is None:
                r.times.first_scheduled_s = now
                self.prompt_tokens_total += r.num_prompt_tokens
        try:
            masks = self.structured_outputs.start_masks(batch)  # computed while the forward pass runs
            prompt_positions = self.prompt_logprobs.positions(batch)
            if prompt_positions:
                logits, sampling, prompt_logits = self.runner.execute_with_prompt_logits(batch, prompt_positions)
                self.prompt_logprobs.record({r.request_id: r for r in batch.requests}, prompt_logits)
            else:
                logits, sampling = self.runner.execute(batch)
            if self.speculator is not None:
                self.speculator.observe(batch, self.model)
            token_masks = masks.result() if masks is not None else None
            if self.speculator is None:
                result = self.sampler(logits, sampling, token_masks)
            else:
                result = self.speculator.sample(logits, sampling, self.sampler, token_masks)
        except Exception as exc:  # one bad step fails its own requests; the engine keeps serving others
            log.exception("engine step failed; failing its %d requests", len(batch.requests))
            return outputs + self._fail(batch, f"{type(exc).__name__}: {exc}")
        outputs += self._update(batch, sampling, result)
        if self.speculator is not None:  # what verifying more tokens costs includes appending and detokenizing them
            self.speculator.record_step(sum(batch.num_new_tokens), time.perf_counter() - started)
        return outputs

    def last_step_shape(self) -> StepShape | None:
        """What the last step computed (None when it scheduled nothing)."""
        return self._last_shape

    def _update(self, batch: ScheduledBatch, sampling: list[Request], result: SampleResult) -> list[RequestOutput]:
        now = time.monotonic()
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
            if request.spec_token_ids:  # the K/V of rejected proposed tokens is dropped
                self.speculator.roll_back(request, self.kv)
            self.kv.cache_computed_blocks(request)
        touched: dict[str, RequestGroup] = {}
        for i, request in enumerate(sampling):
            for token_id, logprob, top in result.row(i):  # several tokens when proposals were accepted
                request.append_token(token_id)
                self.generation_tokens_total += 1
                if request.times.first_token_s is None:
                    request.times.first_token_s = now
                grammar_finish = self.structured_outputs.accept(request, token_id)  # the token's text stays
                finish = check_stop(request, self.max_model_len)
                finish = self.output_processor.process_token(request, token_id, logprob, top, finish) or grammar_finish
                if finish is not None:
                    request.finish_reason = finish
                    request.times.finished_s = now
                    self.scheduler.finish(request)
                    break
            touched[request.group_id] = self.output_processor.groups[request.group_id]
        # Samples 2..n start once the first sample's prompt blocks are cached.
        for request in batch.requests:
            held = self._held_samples.get(request.group_id)
            if held and request.index == 0 and request.num_computed_tokens >= request.num_prompt_tokens:
                for r in self._held_samples.pop(request.group_id):
                    self.scheduler.add(r)
        outputs = []
        for group in touched.values():
            outputs.append(self._with_prompt_logprobs(group, group.next_output()))
            if group.finished:
                self._forget(group)
        return outputs

    def _fail(self, batch: ScheduledBatch, message: str) -> list[RequestOutput]:
        failed = {r.group_id: self.output_processor.groups[r.group_id] for r in batch.requests
                  if r.group_id in self.output_processor.groups}
        outputs = []
        for group in failed.values():
            self._finish_group(group, FinishReason.ERROR)
            outputs.append(group.next_output(error=message))
            self._forget(group)
        return outputs

    def _finish_group(self, group: RequestGroup, reason: FinishReason) -> None:
        """End every unfinished sample of a group now (abort, error), releasing its blocks."""
        held = self._held_samples.pop(group.request_id, [])
        now = time.monotonic()
        for request in group.requests:
            if request.is_finished:
                continue
            if request in held:  # never scheduled
                request.status = RequestStatus.FINISHED
            else:
                self.scheduler.finish(request)
            request.finish_reason = reason
            if reason is FinishReason.ABORT:
                request.times.finished_s = now

    def _with_prompt_logprobs(self, group: RequestGroup, output: RequestOutput) -> RequestOutput:
        output.prompt_logprobs = self.prompt_logprobs.get(group.requests[0])
        return output

    def _forget(self, group: RequestGroup) -> None:
        self._held_samples.pop(group.request_id, None)
        for request in group.requests:
            self.structured_outputs.remove(request)
            self.prompt_logprobs.remove(request)
            if self.speculator is not None:
                self.speculator.forget(request.request_id)
        self.output_processor.remove(group)

    # ---- observability ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + sum(len(h) for h in self._held_samples.values()),
            kv_cache_usage=self.kv.usage(), num_blocks=self.num_blocks, num_free_blocks=self.kv.pool.num_free,
            prefix_cache_queries=self.kv.stats.queries_tokens, prefix_cache_hits=self.kv.stats.hits_tokens,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            spec_decode=None if self.speculator is None else self.speculator.stats.copy())
