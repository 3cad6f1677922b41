"""Owns the model weights and the paged KV cache; turns a scheduled batch into one forward pass."""
from __future__ import annotations

import numpy as np
import torch

from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch
from pernode.serve.kernels.attention_metadata import AttentionMetadata, token_positions
from pernode.serve.kernels.kv_quant import allocate_kv_cache
from pernode.serve.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 kv_dtype: torch.dtype, kv_cache_dtype: str = "auto"):
        self.model = model
        self.device = device
        self.block_size = block_size
        c = model.config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        # per layer (K, V): float tensors, or int8/fp8 values with per-token scales (kernels/kv_quant.py)
        self.kv_caches = [(allocate_kv_cache(shape, kv_cache_dtype, kv_dtype, device),
                           allocate_kv_cache(shape, kv_cache_dtype, kv_dtype, device))
                          for _ in range(c.num_hidden_layers)]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the batch: token ids, positions, cache slots, block tables. Returns also the rows whose
        requests have caught up with their tokens and so sample a next token this step (after their proposed
        tokens, if any, which are laid out after the request's own)."""
        requests, query_lens = batch.requests, batch.num_new_tokens
        num_seqs = len(requests)
        num_cached = [r.num_computed_tokens for r in requests]
        if max(query_lens) == 1 and not any(r.spec_token_ids for r in requests):  # one token per request
            ids = [r.all_token_ids[start] for r, start in zip(requests, num_cached)]
            sample_rows = [i for i, (r, start) in enumerate(zip(requests, num_cached)) if start + 1 == r.num_tokens]
        else:
            ids, sample_rows = [], []
            for i, (r, start, n) in enumerate(zip(requests, num_cached, query_lens)):
                tokens = r.all_token_ids + r.spec_token_ids if r.spec_token_ids else r.all_token_ids
                ids.extend(tokens[start:start + n])
                if start + n == len(tokens):
                    sample_rows.append(i)
        max_blocks = max(len(r.block_ids) for r in requests)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)
        for i, r in enumerate(requests):
            tables[i, :len(r.block_ids)] = r.block_ids
        dev = self.device
        positions = torch.from_numpy(token_positions(num_cached, query_lens)).to(dev)
        meta = AttentionMetadata.build(tables, num_cached, query_lens, self.block_size, dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), positions, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request]]:
        """Run one forward; logits (fp32) of the requests that sample this step, and those requests: one row each,
        or 1 + len(spec_token_ids) consecutive rows for a request verifying proposed tokens."""
        logits, sampling, _ = self.execute_with_prompt_logits(batch, {})
        return logits, sampling

    @torch.inference_mode()
    def execute_with_prompt_logits(self, batch: ScheduledBatch, prompt_positions: dict[str, range]
                                   ) -> tuple[torch.Tensor, list[Request], dict[str, torch.Tensor]]:
        """`execute`, plus the logits at `prompt_positions` (request id -> token positions of this step) for the
        requests that asked for prompt logprobs: only those rows go through the LM head."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        ends = meta.query_start_loc_cpu
        indices = []
        for i in sample_rows:
            indices.extend(range(ends[i + 1] - 1 - len(batch.requests[i].spec_token_ids), ends[i + 1]))
        num_sampled = len(indices)
        spans: dict[str, tuple[int, int]] = {}
        for i, request in enumerate(batch.requests):
            wanted = prompt_positions.get(request.request_id)
            if wanted:
                offset = ends[i] - request.num_computed_tokens  # flat index of position 0
                spans[request.request_id] = (len(indices), len(wanted))
                indices.extend(offset + p for p in wanted)
        if not spans and num_sampled == input_ids.shape[0]:  # every row samples (decode): no gather before lm_head
            logits_indices = None
        else:
            logits_indices = torch.tensor(indices, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, positions, self.kv_caches, meta, logits_indices)
        prompt_logits = {rid: logits[start:start + n] for rid, (start, n) in spans.items()}
        return logits[:num_sampled], [batch.requests[i] for i in sample_rows], prompt_logits
