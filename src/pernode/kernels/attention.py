"""Paged attention: causal attention of a flattened, mixed batch that reads K/V through block tables.

PagedAttention (Kwon et al., arXiv 2309.06180). One call covers prefill chunks and decodes alike: every sequence
brings `query_len` new tokens that sit at the end of its `seq_len` tokens of context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and cached keys live for one forward step.

    The batch holds T query tokens from S sequences, laid end to end.
    """

    query_start_loc: torch.Tensor  # [S+1] int32, cumulative query lengths; seq s owns rows [q[s], q[s+1])
    seq_lens: torch.Tensor  # [S] int32, context length of each sequence after this step (cached + new)
    block_tables: torch.Tensor  # [S, max_blocks] int32, physical block ids, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block * block_size + offset) of each new token
    max_query_len: int
    max_seq_len: int
    # Host copies, so the reference path and Python loops never synchronise with the device.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Scatter the new tokens' K/V into their slots."""
    num_blocks, block_size, hkv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention_reference(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference: gathers each sequence's blocks, then exact causal softmax attention.

    Slow and copy-heavy by design; fast kernels are held to it by the tests.
    """
    _, block_size, hkv, d = k_cache.shape
    hq = query.shape[1]
    group = hq // hkv
    out = torch.empty_like(query)
    qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
    for s, seq_len in enumerate(seq_lens):
        q0, q1 = qsl[s], qsl[s + 1]
        if q1 == q0:
            continue
        n_blocks = (seq_len + block_size - 1) // block_size
        blocks = meta.block_tables[s, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:seq_len]
        v = v_cache[blocks].reshape(-1, hkv, d)[:seq_len]
        q = query[q0:q1]  # [Lq, Hq, D]
        q_len = q1 - q0
        # query i sits at absolute position seq_len - q_len + i and sees keys 0..that position
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [Lq, Lk]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [Hq, Lk, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        scores = torch.matmul(q.transpose(0, 1).float(), k.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out
