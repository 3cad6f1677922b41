"""The pool of KV cache blocks, with prefix caching: full blocks are found again by the hash of their content.

PagedAttention (Kwon et al., arXiv 2309.06180) for the blocks; automatic prefix caching as in vLLM: a block's
hash chains its parent's hash with its token ids, so equal hashes mean equal whole prefixes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = ()  # kept with the hash to rule out collisions


class BlockPool:
    """Free blocks wait in least-recently-freed order; a freed block keeps its cached content until it is
    handed out again, so a later request with the same prefix revives it from the middle of the queue."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is not None and block.token_ids == token_ids:
            return block
        return None

    def take(self, block: Block) -> None:
        """Add a reference to a cached block, reviving it from the free queue if nobody held it."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def allocate(self, count: int) -> list[Block]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks but only {self.num_free} are free")
        out = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict its cached content
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash, block.token_ids = None, ()
            block.ref_count = 1
            out.append(block)
        return out

    def register(self, block: Block, block_hash: int, token_ids: tuple[int, ...]) -> None:
        """Make a full, computed block findable by its content."""
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached.setdefault(block_hash, block)

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference from each block; pass blocks tail-first so a sequence's tail is evicted first."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
