"""The CPU paged-attention kernel, the SDPA path and the dispatcher, held to `paged_attention_reference`."""
from __future__ import annotations

import pytest
import torch

from pernode.serve.kernels import paged_attention_cpu as cpu_module
from pernode.serve.kernels.attention import (
    paged_attention,
    paged_attention_reference,
    paged_attention_sdpa,
    write_kv_cache,
)
from pernode.serve.kernels.attention_metadata import AttentionMetadata
from pernode.serve.kernels.paged_attention_cpu import load_kernel, paged_attention_cpu


def make_problem(
    seqs: list[tuple[int, int]],  # (seq_len, query_len) per sequence
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,  # the cache's, when it differs from the queries'
):
    """Random queries and a paged cache holding every position, on shuffled, non-contiguous blocks.

    Unused slots hold NaN, so a kernel that reads past a sequence's keys fails loudly.
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(L + block_size - 1) // block_size for L, _ in seqs]
    num_blocks = 2 * sum(blocks_per_seq) + 3  # spare blocks interleave with used ones
    ids = torch.randperm(num_blocks, generator=g)
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=kv_dtype or dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    slots, new_slots, qsl = [], [], [0]
    for s, ((L, q_len), n) in enumerate(zip(seqs, blocks_per_seq)):
        block_tables[s, :n] = ids[used : used + n].int()
        used += n
        pos = torch.arange(L)
        seq_slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        slots.append(seq_slots)
        new_slots.append(seq_slots[L - q_len :])
        qsl.append(qsl[-1] + q_len)
    slots = torch.cat(slots)
    key = torch.randn(len(slots), hkv, d, generator=g)
    value = torch.randn(len(slots), hkv, d, generator=g)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    query = torch.randn(qsl[-1], hq, d, generator=g).to(dtype)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([L for L, _ in seqs], dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.cat(new_slots),
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(L for L, _ in seqs),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=[L for L, _ in seqs],
    )
    return query, k_cache, v_cache, meta, d**-0.5


TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),  # one bf16 rounding of the output, either way
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

# Decodes beside prefill chunks, some with cached prefixes, contexts at block boundaries and of one token.
MIXED = [(1, 1), (37, 1), (64, 1), (300, 1), (20, 20), (130, 50), (96, 32), (33, 17), (200, 3), (512, 1)]


@pytest.fixture(scope="module")
def kernel():
    op = load_kernel()
    if op is None:
        pytest.skip("C++ paged attention kernel did not build (see the logged warning)")
    return op


def check(out, ref, dtype):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize(
    "hq,hkv,d,block_size",
    [(9, 3, 64, 16), (32, 8, 128, 32), (4, 4, 64, 32), (8, 2, 128, 16), (6, 2, 96, 24)],
    ids=["smollm-g3", "llama-g4", "mha-g1", "g4-bs16", "d96-bs24"],
)
def test_kernel_mixed_batch_fp32(kernel, hq, hkv, d, block_size):
    query, k_cache, v_cache, meta, scale = make_problem(MIXED, hq, hkv, d, block_size, seed=hq + d)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128)], ids=["g3-d64", "g4-d128"])
def test_kernel_low_precision(kernel, dtype, hq, hkv, d):
    query, k_cache, v_cache, meta, scale = make_problem(MIXED, hq, hkv, d, 16, dtype=dtype, seed=3)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    assert out.dtype == dtype
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), dtype)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16], ids=["fp16-kv", "bf16-kv"])
def test_kernel_fp32_queries_over_a_half_width_cache(kernel, kv_dtype):
    # The engine's default cache under fp32 compute is float16: K/V are widened as read, the math stays fp32, so the
    # kernel matches the reference (which widens the same stored values) to fp32 rounding.
    query, k_cache, v_cache, meta, scale = make_problem(MIXED, 9, 3, 64, 16, seed=5, kv_dtype=kv_dtype)
    assert query.dtype == torch.float32 and k_cache.dtype == kv_dtype
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    assert out.dtype == torch.float32
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.float32)


def test_kernel_block_boundaries_and_empty_sequences(kernel):
    # Every length around a block edge, one sequence with no new tokens this step, one that is all new.
    seqs = [(15, 1), (16, 1), (17, 1), (31, 2), (32, 16), (33, 1), (48, 48), (40, 0), (1, 1)]
    query, k_cache, v_cache, meta, scale = make_problem(seqs, 9, 3, 64, 16, seed=5)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.float32)


@pytest.mark.parametrize("seqs", [[(2048, 1)], [(1000, 1), (700, 2)], [(1500, 40)]], ids=["1x2048", "2-seqs", "chunk"])
def test_kernel_split_kv(kernel, seqs):
    # Few sequences and many threads: the kernel slices the kv range over threads and merges the slices.
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        query, k_cache, v_cache, meta, scale = make_problem(seqs, 9, 3, 64, 16, seed=7)
        out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    finally:
        torch.set_num_threads(threads)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.float32)


def decode_alone(query, k_cache, v_cache, meta, scale, seq, j):
    """The kernel's output for query j of sequence `seq` computed as a decode: that query alone, at its position."""
    q0, q1 = meta.query_start_loc_cpu[seq], meta.query_start_loc_cpu[seq + 1]
    seq_len = meta.seq_lens_cpu[seq] - (q1 - q0) + j + 1
    one = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32), seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=meta.block_tables[seq:seq + 1], slot_mapping=meta.slot_mapping[:1], max_query_len=1,
        max_seq_len=seq_len, query_start_loc_cpu=[0, 1], seq_lens_cpu=[seq_len])
    return paged_attention_cpu(query[q0 + j:q0 + j + 1], k_cache, v_cache, one, scale)


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float32, torch.float16)], ids=["fp32", "bf16", "fp32-fp16-kv"])
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("seqs,seq", [([(41, 5)], 0), ([(700, 4)], 0), ([(1500, 17)], 0), ([(1400, 2)], 0),
                                      ([(60, 1), (41, 5), (300, 200), (33, 3)], 1)],
                         ids=["short", "split-from-verify", "long-k16", "long-k1", "in-a-batch"])
def test_kernel_verify_rows_equal_decodes_bit_for_bit(kernel, seqs, seq, threads, dtype, kv_dtype):
    # Speculative verification scores k + 1 queries of one sequence at once; each must come out exactly as the
    # decode at its position would, split kv included (fp32 output shows any other accumulation order).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        query, k_cache, v_cache, meta, scale = make_problem(seqs, 9, 3, 64, 16, dtype=dtype, seed=13,
                                                            kv_dtype=kv_dtype)
        out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
        q0, q1 = meta.query_start_loc_cpu[seq], meta.query_start_loc_cpu[seq + 1]
        for j in range(q1 - q0):
            assert torch.equal(out[q0 + j:q0 + j + 1], decode_alone(query, k_cache, v_cache, meta, scale, seq, j)), j
    finally:
        torch.set_num_threads(before)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), dtype)


def test_kernel_long_prefill_chunk(kernel):
    # Several query tiles per sequence, the later ones with a cached prefix in front.
    query, k_cache, v_cache, meta, scale = make_problem([(700, 300), (200, 200)], 9, 3, 64, 32, seed=11)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.float32)


def test_kernel_rejects_bad_metadata(kernel):
    query, k_cache, v_cache, meta, scale = make_problem([(40, 1)], 9, 3, 64, 16)
    meta.block_tables[0, 1] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match="block_tables"):
        paged_attention_cpu(query, k_cache, v_cache, meta, scale)


def test_dispatcher_cpu(kernel):
    query, k_cache, v_cache, meta, scale = make_problem(MIXED, 9, 3, 64, 16, seed=13)
    ref = paged_attention_reference(query, k_cache, v_cache, meta, scale)
    check(paged_attention(query, k_cache, v_cache, meta, scale), ref, torch.float32)


def test_dispatcher_forced_reference(monkeypatch):
    query, k_cache, v_cache, meta, scale = make_problem(MIXED[:4], 9, 3, 64, 16)
    monkeypatch.setenv("PERNODE_ATTENTION", "reference")
    monkeypatch.setattr(cpu_module, "paged_attention_cpu",
                        lambda *a: pytest.fail("kernel used despite PERNODE_ATTENTION"))
    out = paged_attention(query, k_cache, v_cache, meta, scale)
    assert torch.equal(out, paged_attention_reference(query, k_cache, v_cache, meta, scale))


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)])
def test_sdpa_path(hq, hkv):
    # The path other devices take, checked here on CPU.
    query, k_cache, v_cache, meta, scale = make_problem(MIXED, hq, hkv, 64, 16, seed=17)
    out = paged_attention_sdpa(query, k_cache, v_cache, meta, scale)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, hkv, d = 6, 16, 3, 64
    k_cache = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:40]
    key, value = torch.randn(40, hkv, d, generator=g), torch.randn(40, hkv, d, generator=g)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.view(-1, hkv, d)
    flat_v = v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[slots], key.to(dtype))
    assert torch.equal(flat_v[slots], value.to(dtype))
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.mark.parametrize("block_size", [8, 15, 16, 32])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (16, 2, 128)], ids=["g3-d64", "g8-d128"])
def test_kernel_bf16_over_chunks_and_odd_tails(kernel, block_size, hq, hkv, d):
    # bf16 queries over a bf16 cache (on AVX512_BF16, the vdpbf16ps paths): decodes whose contexts span several score
    # chunks (512 keys) and end mid-block, on odd keys and past NaN-filled slots, beside a long context and prefill
    # chunks of odd lengths; even and odd block sizes.
    seqs = [(1, 1), (7, 1), (513, 1), (1300, 1), (1025, 3), (2500, 1), (40, 20), (97, 97), (700, 151)]
    query, k_cache, v_cache, meta, scale = make_problem(seqs, hq, hkv, d, block_size, dtype=torch.bfloat16, seed=11)
    out = paged_attention_cpu(query, k_cache, v_cache, meta, scale)
    check(out, paged_attention_reference(query, k_cache, v_cache, meta, scale), torch.bfloat16)
