"""Paged attention: causal attention of a flattened, mixed batch that reads K/V through block tables.

PagedAttention (Kwon et al., arXiv 2309.06180). One call covers prefill chunks and decodes alike: every sequence
brings `query_len` new tokens that sit at the end of its `seq_len` tokens of context.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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

    @classmethod
    def build(cls, block_tables: np.ndarray | torch.Tensor, num_cached: Sequence[int], query_lens: Sequence[int],
              block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """The one way to lay out a step: sequence s owns the blocks in row s of `block_tables` ([S, max_blocks],
        padded with 0), has `num_cached[s]` tokens in the cache already and brings `query_lens[s]` new ones."""
        tables = np.asarray(block_tables.cpu() if isinstance(block_tables, torch.Tensor) else block_tables,
                            dtype=np.int64)
        query_start, seq_lens, slots = [0], [], []
        for s, (start, n) in enumerate(zip(num_cached, query_lens)):
            pos = np.arange(start, start + n)
            slots.append(tables[s, pos // block_size] * block_size + pos % block_size)
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
        return cls(query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
                   seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                   block_tables=torch.from_numpy(tables.astype(np.int32)).to(device),
                   slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
                   max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                   query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens)


def contiguous_block_tables(num_seqs: int, tokens_per_seq: int, block_size: int) -> torch.Tensor:
    """Block tables [S, blocks_per_seq] for S sequences laid one after another in a cache of their own: what
    evaluation and profiling use when no block pool is involved."""
    blocks_per_seq = -(-tokens_per_seq // block_size)
    return torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)


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


def _sequences(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
    """Per sequence with queries: (q0, q1, keys, values, causal mask), the sequence's K/V gathered from its blocks
    ([Lk, Hkv, D]) and the mask bottom-right aligned: query i sits at position seq_len - q_len + i and sees
    keys 0..that position ([Lq, Lk])."""
    _, block_size, hkv, d = k_cache.shape
    qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
    for s, seq_len in enumerate(seq_lens):
        q0, q1 = qsl[s], qsl[s + 1]
        if q1 == q0:
            continue
        blocks = meta.block_tables[s, :-(-seq_len // block_size)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:seq_len]
        v = v_cache[blocks].reshape(-1, hkv, d)[:seq_len]
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        yield q0, q1, k, v, mask


def paged_attention_reference(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference: gathers each sequence's blocks, then exact causal softmax attention in fp32.

    Slow and copy-heavy by design; fast kernels are held to it by the tests.
    """
    group = query.shape[1] // k_cache.shape[2]
    out = torch.empty_like(query)
    for q0, q1, k, v, mask in _sequences(query, k_cache, v_cache, meta):
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [Hq, Lk, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        scores = torch.matmul(query[q0:q1].transpose(0, 1).float(), k.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[q0:q1] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out


def paged_attention_sdpa(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Per-sequence gather, then torch's fused `scaled_dot_product_attention`: correct on any device."""
    hq, hkv = query.shape[1], k_cache.shape[2]
    out = torch.empty_like(query)
    for q0, q1, k, v, mask in _sequences(query, k_cache, v_cache, meta):
        # 4-D [1, H, L, D]: with 3-D inputs SDPA skips its fused kernels for the math path
        k = k.transpose(0, 1)[None].to(query.dtype)
        v = v.transpose(0, 1)[None].to(query.dtype)
        q = query[q0:q1].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if q1 - q0 > 1 else None, scale=scale,
                                           enable_gqa=hq != hkv)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Paged attention by the fastest path that is correct for the device; the result of `paged_attention_reference`.

    CPU: the C++ kernel (`pernode.serve.kernels.paged_attention_cpu`) if it built and handles the shapes, else the reference.
    Other devices: `paged_attention_sdpa`. `PERNODE_ATTENTION=reference` forces the reference everywhere.
    """
    if os.environ.get("PERNODE_ATTENTION", "").lower() == "reference":
        return paged_attention_reference(query, k_cache, v_cache, meta, scale)
    if query.device.type == "cpu":
        from pernode.serve.kernels import paged_attention_cpu as cpu  # lazy: it imports this module and may compile

        if cpu.kernel_supports(query, k_cache, v_cache) and cpu.load_kernel() is not None:
            return cpu.paged_attention_cpu(query, k_cache, v_cache, meta, scale)
        return paged_attention_reference(query, k_cache, v_cache, meta, scale)
    return paged_attention_sdpa(query, k_cache, v_cache, meta, scale)
