"""Owns the model weights and the paged KV cache; turns a scheduled batch into one forward pass."""
from __future__ import annotations

import numpy as np
import torch

from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch
from pernode.serve.kernels.attention_metadata import AttentionMetadata
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
        requests have caught up with their tokens and so sample a next token this step."""
        ids, pos = [], []
        max_blocks = max(len(r.block_ids) for r in batch.requests)
        tables = np.zeros((len(batch.requests), max_blocks), dtype=np.int32)
        num_cached, sample_rows = [], []
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            ids.extend(request.all_token_ids[start:start + n])
            tables[i, :len(request.block_ids)] = request.block_ids
            pos.append(np.arange(start, start + n))
            num_cached.append(start)
            if start + n == request.num_tokens:
                sample_rows.append(i)
        dev = self.device
        positions = torch.from_numpy(np.concatenate(pos)).to(dev)
        meta = AttentionMetadata.build(tables, num_cached, batch.num_new_tokens, self.block_size, dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), positions, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request]]:
        """Run one forward; logits [S, vocab] (fp32) of the requests that sample this step, and those requests."""
        logits, sampling, _ = self.execute_with_prompt_logits(batch, {})
        return logits, sampling

    @torch.inference_mode()
    def execute_with_prompt_logits(self, batch: ScheduledBatch, prompt_positions: dict[str, range]
                                   ) -> tuple[torch.Tensor, list[Request], dict[str, torch.Tensor]]:
        """`execute`, plus the logits at `prompt_positions` (request id -> token positions of this step) for the
        requests that asked for prompt logprobs: only those rows go through the LM head."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        indices = [meta.query_start_loc_cpu[i + 1] - 1 for i in sample_rows]
        num_sampled = len(indices)
        spans: dict[str, tuple[int, int]] = {}
        for i, request in enumerate(batch.requests):
            wanted = prompt_positions.get(request.request_id)
            if wanted:
                offset = meta.query_start_loc_cpu[i] - request.num_computed_tokens  # flat index of position 0
                spans[request.request_id] = (len(indices), len(wanted))
                indices.extend(offset + p for p in wanted)
        logits_indices = torch.tensor(indices, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, positions, self.kv_caches, meta, logits_indices)
        prompt_logits = {rid: logits[start:start + n] for rid, (start, n) in spans.items()}
        return logits[:num_sampled], [batch.requests[i] for i in sample_rows], prompt_logits
