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
    kv.record_prefix_query(b, 12)  # what the scheduler does once it admits b
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


# Python's hash of a small int is its value mod 2**61 - 1, so these two token ids have equal hash(): two first
# blocks that collide under a key built from hash((parent, tokens)), as an attacker would build them (on
# Python >= 3.12 hash(None) is a constant, so such chains can be computed offline: vLLM CVE-2025-25183).
_MODULUS = 2**61 - 1


def test_prefixes_built_to_collide_do_not_share_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a0, b0, x = [5, 1, 2, 3], [5 + _MODULUS, 1, 2, 3], [7, 8, 9, 10]
    assert hash((None, tuple(a0))) == hash((None, tuple(b0)))  # the old key collides
    c = make_request(b0 + [11], "c")  # caches a block of content b0
    compute_all(kv, c)
    a = make_request(a0 + x + [11], "a")  # caches x after the prefix a0
    compute_all(kv, a)
    b = make_request(b0 + x + [11], "b")
    hits = kv.find_cached_prefix(b)
    # b may reuse c's block (same tokens b0) but never a's block of x, whose K/V were computed after a0
    assert [blk.block_id for blk in hits] == c.block_ids[:1]
    for r in (a, c):
        kv.free(r)
    kv.check_no_leak()


def test_block_key_is_a_chained_sha256_that_takes_a_salt():
    from pernode.serve.engine.block_pool import hash_block, root_hash

    root = root_hash(None)
    first = hash_block(root, (1, 2, 3, 4))
    assert isinstance(first, bytes) and len(first) == 32
    assert hash_block(root, (1, 2, 3, 4)) == first  # deterministic, unlike hash() across processes
    assert hash_block(first, (5, 6)) != hash_block(root, (5, 6))  # the parent enters the key
    assert hash_block(root_hash("tenant-a"), (1, 2, 3, 4)) != first  # the salt enters the first block

    salted = KVCacheManager(num_blocks=8, block_size=4, salt="tenant-a")
    plain = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(1, 10))
    for kv in (salted, plain):
        compute_all(kv, make_request(tokens, "a"))
    assert (salted.pool.blocks[0].block_hash != plain.pool.blocks[0].block_hash)
    assert len(salted.find_cached_prefix(make_request(tokens, "b"))) == 2


def test_prefix_stats_count_a_waiting_request_once():
    """The head request retried on every step while blocks are short is one query, counted when admitted."""
    from pernode.serve.engine.scheduler import Scheduler, SchedulerConfig

    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    hog = make_request(list(range(1, 14)), "hog")  # 13 tokens: all 4 blocks
    sched.add(hog)
    assert sched.schedule().requests == [hog]
    hog.num_computed_tokens = hog.num_tokens
    kv.cache_computed_blocks(hog)
    waiter = make_request(list(range(1, 9)) + [50, 51], "w")  # 10 tokens, shares 2 blocks with hog
    sched.add(waiter)
    for _ in range(5):  # no room: the waiter stays at the head of the queue
        batch = sched.schedule()
        assert waiter not in batch.requests
    assert kv.stats.queries_tokens == 13 and kv.stats.hits_tokens == 0
    sched.finish(hog)
    assert sched.schedule().requests == [waiter]
    assert kv.stats.queries_tokens == 13 + 10 and kv.stats.hits_tokens == 8
    sched.finish(waiter)
    kv.check_no_leak()


def test_reset_prefix_cache_forgets_prefixes_only_when_no_block_is_held():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(1, 10))  # 2 full blocks and one token
    first = make_request(tokens, "a")
    compute_all(kv, first)
    assert not kv.reset_prefix_cache()  # a request holds blocks: nothing forgotten
    assert len(kv.find_cached_prefix(make_request(tokens, "b"))) == 2
    kv.free(first)
    assert len(kv.find_cached_prefix(make_request(tokens, "c"))) == 2  # freed blocks keep their content...
    assert kv.reset_prefix_cache()
    assert kv.find_cached_prefix(make_request(tokens, "d")) == []  # ...until the reset
    assert all(b.block_hash is None for b in kv.pool.blocks) and kv.pool.num_free == 8
    compute_all(kv, make_request(tokens, "e"))  # and the pool caches again afterwards
    assert len(kv.find_cached_prefix(make_request(tokens, "f"))) == 2
