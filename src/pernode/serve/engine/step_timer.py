"""Timed synthetic steps: what one step of `batch_size` decodes at `context_len` costs, alone or sharing the step
with a prompt chunk, measured through the engine's own runner and sampler over a KV cache filled to that length
(step time depends on shapes, not values)."""
from __future__ import annotations

import time

import torch

from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.model_runner import ModelRunner
from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.sampler import Sampler


def random_prompt(vocab_size: int, n: int, g: torch.Generator) -> list[int]:
    # ids above the special tokens, fresh per call so the prefix cache never hits
    return torch.randint(1000, vocab_size, (n,), generator=g).tolist()


def decode_step_times_s(kv: KVCacheManager, runner: ModelRunner, sampler: Sampler, vocab_size: int,
                        batch_size: int, context_len: int, num_steps: int, g: torch.Generator) -> list[float] | None:
    """Wall time of each of `num_steps` decode steps (forward + sampling); None when the free KV blocks cannot
    hold the batch. The blocks are taken from the pool and given back, so a live engine can be measured idle."""
    return timed_steps_s(kv, runner, sampler, vocab_size, batch_size, context_len, 0, num_steps, g)


def mixed_step_times_s(kv: KVCacheManager, runner: ModelRunner, sampler: Sampler, vocab_size: int,
                       batch_size: int, context_len: int, prompt_tokens: int, num_steps: int,
                       g: torch.Generator) -> list[float] | None:
    """Wall time of each of `num_steps` steps that give `batch_size` sequences at `context_len` one token each and
    prefill a fresh `prompt_tokens`-token prompt in the same forward pass, as chunked prefill batches them."""
    return timed_steps_s(kv, runner, sampler, vocab_size, batch_size, context_len, prompt_tokens, num_steps, g)


def timed_steps_s(kv: KVCacheManager, runner: ModelRunner, sampler: Sampler, vocab_size: int, batch_size: int,
                  context_len: int, prompt_tokens: int, num_steps: int, g: torch.Generator) -> list[float] | None:
    """`num_steps` timed steps of `batch_size` decodes at `context_len`, each also prefilling a fresh
    `prompt_tokens`-token prompt when that is > 0 (a new prompt every step, so none reuses another's K/V)."""
    need = batch_size * kv.blocks_needed(context_len + num_steps)
    if prompt_tokens:
        need += kv.blocks_needed(prompt_tokens + 1)
    if need > kv.pool.num_free:
        return None
    decodes: list[Request] = []
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True)
    try:
        for i in range(batch_size):
            r = Request(f"profile-{i}", random_prompt(vocab_size, context_len, g), params, [])
            kv.allocate(r, context_len + num_steps)
            r.num_computed_tokens = context_len - 1  # placeholder K/V up to here; one new token per step
            decodes.append(r)
        times = []
        for step in range(num_steps):
            prompt = None
            if prompt_tokens:
                prompt = Request(f"profile-prompt-{step}", random_prompt(vocab_size, prompt_tokens, g), params, [])
                kv.allocate(prompt, prompt_tokens)
            try:
                batch = ScheduledBatch(decodes + [prompt] if prompt else decodes,
                                       [1] * batch_size + ([prompt_tokens] if prompt else []))
                start = time.perf_counter()
                logits, sampling = runner.execute(batch)
                result = sampler(logits, sampling)
                if runner.device.type == "cuda":
                    torch.cuda.synchronize(runner.device)
                times.append(time.perf_counter() - start)
            finally:
                if prompt is not None:
                    kv.free(prompt)
            for r, tok in zip(decodes, result.token_ids):
                r.num_computed_tokens += 1
                r.append_token(tok)
        return times
    finally:
        for r in decodes:
            kv.free(r)
