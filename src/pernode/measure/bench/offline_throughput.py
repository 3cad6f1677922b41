"""Offline throughput: a fixed, seeded batch of requests submitted at once, run to completion.

The same workload drives pernode's engine and the peers (HF transformers `generate` with static batches), so
their output tokens/s are comparable within one run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from pernode.progress import progress

from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams


@dataclass(frozen=True)
class OfflineWorkload:
    prompts: list[list[int]]  # token ids
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def random_workload(num_requests: int, vocab_size: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0, avoid_ids: tuple[int, ...] = ()) -> OfflineWorkload:
    """Prompts of random ordinary tokens (ids above the special tokens), lengths uniform in the given ranges."""
    g = torch.Generator().manual_seed(seed)
    low = max(avoid_ids, default=-1) + 1
    prompts, outs = [], []
    for _ in range(num_requests):
        n = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=g))
        prompts.append(torch.randint(low, vocab_size, (n,), generator=g).tolist())
        outs.append(int(torch.randint(output_len[0], output_len[1] + 1, (1,), generator=g)))
    return OfflineWorkload(prompts, outs)


@dataclass(frozen=True)
class ThroughputResult:
    system: str
    elapsed_s: float
    num_requests: int
    output_tokens: int
    prompt_tokens: int
    note: str = ""

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.elapsed_s


def run_pernode(llm: LLM, workload: OfflineWorkload, use_tqdm: bool = True) -> ThroughputResult:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != workload.num_output_tokens:  # ignore_eos holds every output to its max_tokens
        raise RuntimeError(f"pernode produced {produced} tokens, {workload.num_output_tokens} were asked for")
    return ThroughputResult("pernode", elapsed, len(outputs), produced, workload.num_prompt_tokens,
                            note=f"continuous batching, {llm.engine.dtype}".replace("torch.", ""))


def run_hf_static(hf_model, workload: OfflineWorkload, batch_size: int, pad_token_id: int,
                  use_tqdm: bool = True) -> ThroughputResult:
    """HF `generate` in arrival-order static batches: each batch is left-padded and runs until its longest
    requested output, the classic request-level batching continuous batching replaces."""
    n = len(workload.prompts)
    start = time.perf_counter()
    with progress(disable=not use_tqdm, transient=True) as bar:
        task = bar.add_task(f"HF generate (batch {batch_size})", total=n)
        for i in range(0, n, batch_size):
            prompts = workload.prompts[i:i + batch_size]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            new = max(workload.output_lens[i:i + batch_size])
            with torch.inference_mode():
                hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=pad_token_id)
            bar.advance(task, len(prompts))
    elapsed = time.perf_counter() - start
    return ThroughputResult(f"hf-transformers (batch {batch_size})", elapsed, n, workload.num_output_tokens,
                            workload.num_prompt_tokens, note="static batches, fp32")
