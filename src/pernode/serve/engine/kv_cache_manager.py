"""Maps requests to KV blocks: prefix-cache lookup at admission, growth as tokens are computed, release."""
from __future__ import annotations

from dataclasses import dataclass

from pernode.serve.engine.block_pool import Block, BlockPool, hash_block, root_hash
from pernode.serve.engine.request import Request


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up, and found, at each admission of a request (a retry while it waits is not one)."""
    queries_tokens: int = 0
    hits_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: str | None = None):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = root_hash(salt)  # the parent key of every sequence's first block
        self.stats = PrefixCacheStats()

    def usage(self) -> float:
        return self.pool.usage()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hash(self, request: Request, index: int) -> tuple[bytes, bytes, tuple[int, ...]]:
        """(key, parent key, tokens) of the request's `index`-th full block; keys are memoised on the request."""
        while len(request.block_hashes) <= index:
            i = len(request.block_hashes)
            parent = request.block_hashes[i - 1] if i else self.root_hash
            tokens = tuple(request.all_token_ids[i * self.block_size:(i + 1) * self.block_size])
            request.block_hashes.append(hash_block(parent, tokens))
        tokens = tuple(request.all_token_ids[index * self.block_size:(index + 1) * self.block_size])
        parent = request.block_hashes[index - 1] if index else self.root_hash
        return request.block_hashes[index], parent, tokens

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of cached full blocks matching the request's tokens. At least one token is always
        left to compute, since its logits are needed to sample. Counts nothing: the scheduler may ask again
        every step while the request waits; `record_prefix_query` counts the admission."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt position: no position may be skipped
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for i in range(max_blocks):
            block = self.pool.lookup(*self._full_block_hash(request, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_query(self, request: Request, num_cached_tokens: int) -> None:
        """Count one admission's lookup in the prefix-cache stats."""
        if self.enable_prefix_caching:
            self.stats.queries_tokens += request.num_tokens
            self.stats.hits_tokens += num_cached_tokens

    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[Block] = ()) -> bool:
        """Give the request room for `num_new_tokens` more tokens. False (and nothing changed) if blocks are short.

        Cached prefix blocks that sit in the free queue count as free: taking them removes them from it.
        """
        num_reused = len(cached_prefix)
        total_tokens = (num_reused * self.block_size if num_reused else request.num_computed_tokens) + num_new_tokens
        num_new_blocks = self.blocks_needed(total_tokens) - len(request.block_ids) - num_reused
        revived = sum(1 for b in cached_prefix if b.ref_count == 0)
        if num_new_blocks + revived > self.pool.num_free:
            return False
        for block in cached_prefix:
            self.pool.take(block)
        request.block_ids.extend(b.block_id for b in cached_prefix)
        request.num_hashed_blocks = max(request.num_hashed_blocks, num_reused)
        if num_new_blocks > 0:
            request.block_ids.extend(b.block_id for b in self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register blocks that are now full of computed tokens, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        # capped by the tokens the request holds: accepted proposed tokens are computed before they are appended
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        for i in range(request.num_hashed_blocks, num_full):
            block_hash, parent, tokens = self._full_block_hash(request, i)
            self.pool.register(self.pool.blocks[request.block_ids[i]], block_hash, parent, tokens)
        request.num_hashed_blocks = max(request.num_hashed_blocks, num_full)

    def free_tail(self, request: Request, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens (those that held rejected proposed tokens).
        They were never registered in the prefix cache: only blocks full of computed, kept tokens are."""
        keep = self.blocks_needed(num_tokens)
        if len(request.block_ids) > keep:
            self.pool.free([self.pool.blocks[b] for b in reversed(request.block_ids[keep:])])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.pool.free([self.pool.blocks[b] for b in reversed(request.block_ids)])
        request.block_ids = []
        request.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes (BlockPool.reset_prefix_cache): False while requests hold blocks."""
        return self.pool.reset_prefix_cache()

    def check_no_leak(self) -> None:
        """Every block free: for tests and for the server's idle invariant."""
        held = [b.block_id for b in self.pool.blocks if b.ref_count]
        if held or self.pool.num_free != self.pool.num_blocks:
            raise AssertionError(f"{len(held)} KV blocks still referenced: {held[:10]}")
