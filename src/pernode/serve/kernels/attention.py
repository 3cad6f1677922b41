"""Paged attention: causal attention of a flattened, mixed batch that reads K/V through block tables.

PagedAttention (Kwon et al., arXiv 2309.06180). One call covers prefill chunks and decodes alike: every sequence
brings `query_len` new tokens that sit at the end of its `seq_len` tokens of context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pernode import envs
from pernode.envs import KernelChoice
from pernode.serve.kernels import paged_attention_cpu
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.kernels.kv_quant import KVCache, QuantizedKV, gather_blocks, write_quantized


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: KVCache,  # [num_blocks, block_size, Hkv, D], float or QuantizedKV
    v_cache: KVCache,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Scatter the new tokens' K/V into their slots (quantized on the way into a QuantizedKV cache)."""
    if isinstance(k_cache, QuantizedKV):
        write_quantized(key, k_cache, slot_mapping)
        write_quantized(value, v_cache, slot_mapping)
        return
    num_blocks, block_size, hkv, d = k_cache.shape
    if key.dtype != k_cache.dtype:  # checked here: a no-op .to still costs a dispatch, twice per layer per step
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, key)
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, value)


def _sequences(query: torch.Tensor, k_cache: KVCache, v_cache: KVCache, meta: AttentionMetadata):
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
        k = gather_blocks(k_cache, blocks).reshape(-1, hkv, d)[:seq_len]
        v = gather_blocks(v_cache, blocks).reshape(-1, hkv, d)[:seq_len]
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        yield q0, q1, k, v, mask


def paged_attention_reference(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: KVCache,  # [num_blocks, block_size, Hkv, D], float or QuantizedKV
    v_cache: KVCache,
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
    k_cache: KVCache,  # [num_blocks, block_size, Hkv, D], float or QuantizedKV
    v_cache: KVCache,
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
    k_cache: KVCache,  # [num_blocks, block_size, Hkv, D], float or QuantizedKV
    v_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    force_reference: bool | None = None,
) -> torch.Tensor:
    """Paged attention by the fastest path that is correct for the device; the result of `paged_attention_reference`.

    CPU: the C++ kernel (`pernode.serve.kernels.paged_attention_cpu`) if it built and handles the shapes, else the
    reference. Other devices: `paged_attention_sdpa`. `PERNODE_ATTENTION=reference` forces the reference everywhere;
    a layer reads it once and passes `force_reference`, a direct call reads it each time.
    """
    if force_reference is None:
        force_reference = envs.attention_kernel() is KernelChoice.REFERENCE
    if force_reference:
        return paged_attention_reference(query, k_cache, v_cache, meta, scale)
    if query.device.type == "cpu":
        cpu = paged_attention_cpu
        if cpu.kernel_supports(query, k_cache, v_cache) and cpu.load_kernel() is not None:
            return cpu.paged_attention_cpu(query, k_cache, v_cache, meta, scale)
        return paged_attention_reference(query, k_cache, v_cache, meta, scale)
    return paged_attention_sdpa(query, k_cache, v_cache, meta, scale)
