"""Owns the model weights and the paged KV cache; turns a scheduled batch into one forward pass."""
from __future__ import annotations

import numpy as np
import torch

from pernode.serve.engine.request import Request
from pernode.serve.engine.scheduler import ScheduledBatch
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 kv_dtype: torch.dtype):
        self.model = model
        self.device = device
        self.block_size = block_size
        c = model.config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=device),
                           torch.zeros(shape, dtype=kv_dtype, device=device))
                          for _ in range(c.num_hidden_layers)]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the batch: token ids, positions, cache slots, block tables. Returns also the rows whose
        requests have caught up with their tokens and so sample a next token this step (after their proposed
        tokens, if any, which are laid out after the request's own)."""
        ids, pos = [], []
        max_blocks = max(len(r.block_ids) for r in batch.requests)
        tables = np.zeros((len(batch.requests), max_blocks), dtype=np.int32)
        num_cached, sample_rows = [], []
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            tokens = request.all_token_ids + request.spec_token_ids if request.spec_token_ids else request.all_token_ids
            ids.extend(tokens[start:start + n])
            tables[i, :len(request.block_ids)] = request.block_ids
            pos.append(np.arange(start, start + n))
            num_cached.append(start)
            if start + n == len(tokens):
                sample_rows.append(i)
        dev = self.device
        positions = torch.from_numpy(np.concatenate(pos)).to(dev)
        meta = AttentionMetadata.build(tables, num_cached, batch.num_new_tokens, self.block_size, dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), positions, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request]]:
        """Run one forward; logits (fp32) of the requests that sample this step, and those requests: one row each,
        or 1 + len(spec_token_ids) consecutive rows for a request verifying proposed tokens."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        rows = []
        for i in sample_rows:
            end = meta.query_start_loc_cpu[i + 1]
            rows.extend(range(end - 1 - len(batch.requests[i].spec_token_ids), end))
        logits_indices = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, positions, self.kv_caches, meta, logits_indices)
        return logits, [batch.requests[i] for i in sample_rows]
