"""Block pool and KV cache manager: prefix hashing, ref counts, LRU eviction, no leaks."""
import pytest

from pernode.serve.engine.block_pool import BlockPool
from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.engine.request import Request
from pernode.serve.sampling.params import SamplingParams


def make_request(tokens, rid="r"):
    return Request(rid, tokens, SamplingParams(max_tokens=4), eos_token_ids=[0])


def compute_all(kv, request):
    assert kv.allocate(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request)


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = make_request(list(range(1, 11)))  # 10 tokens -> 3 blocks
    compute_all(kv, r)
    assert len(r.block_ids) == 3 and kv.pool.num_free == 5
    kv.free(r)
    kv.check_no_leak()


def test_allocation_fails_cleanly_when_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make_request(list(range(1, 11)))
    assert not kv.allocate(r, 10)
    assert r.block_ids == [] and kv.pool.num_free == 2


def test_prefix_hit_shares_blocks_and_counts_stats():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request(list(range(1, 14)), "a")  # 13 tokens: 3 full blocks
    compute_all(kv, a)
    b = make_request(list(range(1, 13)) + [99, 98], "b")  # shares the first 3 blocks (12 tokens)
    hits = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in hits] == a.block_ids[:3]
    assert kv.allocate(b, b.num_tokens - 12, hits)
    assert b.block_ids[:3] == a.block_ids[:3]
    assert all(kv.pool.blocks[i].ref_count == 2 for i in a.block_ids[:3])
    assert kv.stats.hits_tokens == 12 and kv.stats.queries_tokens == 14
    kv.free(a)
    kv.free(b)
    kv.check_no_leak()


def test_whole_prompt_hit_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request(list(range(1, 9)), "a")  # exactly 2 blocks
    compute_all(kv, a)
    b = make_request(list(range(1, 9)), "b")
    assert len(kv.find_cached_prefix(b)) == 1  # the last block is recomputed to get logits


def test_freed_blocks_stay_cached_until_evicted_in_lru_order():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request([1, 2, 3, 4, 5], "a")  # 3 blocks, 2 full
    compute_all(kv, a)
    kv.free(a)
    kv.check_no_leak()
    # still findable after free
    b = make_request([1, 2, 3, 4, 7], "b")
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    kv.allocate(b, 1, hits)
    b.num_computed_tokens = 5
    assert kv.pool.num_free == 1  # two revived from the middle of the free queue, one new
    kv.free(b)
    # allocating everything evicts the cached content
    c = make_request(list(range(50, 58)), "c")
    compute_all(kv, c)
    assert kv.find_cached_prefix(make_request([1, 2, 3, 4, 9], "d")) == []
    kv.free(c)
    kv.check_no_leak()


def test_tail_blocks_are_evicted_before_the_prefix():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.free(list(reversed(blocks)))  # how a request frees: tail first
    assert [b.block_id for b in pool.allocate(1)] == [blocks[-1].block_id]


def test_double_free_is_caught():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError):
        pool.free([b])
