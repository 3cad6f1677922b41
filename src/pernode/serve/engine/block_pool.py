"""The pool of KV cache blocks, with prefix caching: full blocks are found again by the hash of their content.

PagedAttention (Kwon et al., arXiv 2309.06180) for the blocks; automatic prefix caching as in vLLM: a block's
key is a SHA-256 chained over its parent's key and its token ids, so equal keys mean equal whole prefixes. Not
Python's hash(): 64 bits collide by construction, and on Python >= 3.12 hash(None) is a constant, so colliding
chains can be computed offline (vLLM CVE-2025-25183). An optional salt enters the chain's root, so prefixes are
shared only between requests served under the same salt.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

_ROOT_DOMAIN = b"pernode-prefix-cache-v1\0"


def root_hash(salt: str | None) -> bytes:
    """The parent key of a sequence's first block: the salt (if any) enters every key of the chain through it."""
    data = _ROOT_DOMAIN if salt is None else _ROOT_DOMAIN + b"salt\0" + salt.encode("utf-8")
    return hashlib.sha256(data).digest()


def hash_block(parent_hash: bytes, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 of the parent's 32-byte key followed by the token ids packed as int64: unambiguous, since the
    parent key has a fixed length and a block's tokens are all that follows it."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and computed
    parent_hash: bytes | None = None  # the key of the block before it in the sequence (or the chain's root)
    token_ids: tuple[int, ...] = ()  # kept with the keys: a lookup compares the whole (parent, tokens) content


class BlockPool:
    """Free blocks wait in least-recently-freed order; a freed block keeps its cached content until it is
    handed out again, so a later request with the same prefix revives it from the middle of the queue."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def lookup(self, block_hash: bytes, parent_hash: bytes, token_ids: tuple[int, ...]) -> Block | None:
        """The cached block with this key whose parent key and tokens are these too, so a hit means the same
        tokens after the same prefix (the parent key being itself the SHA-256 chain of that prefix)."""
        block = self.cached.get(block_hash)
        if block is not None and block.parent_hash == parent_hash and block.token_ids == token_ids:
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
                block.block_hash, block.parent_hash, block.token_ids = None, None, ()
            block.ref_count = 1
            out.append(block)
        return out

    def register(self, block: Block, block_hash: bytes, parent_hash: bytes, token_ids: tuple[int, ...]) -> None:
        """Make a full, computed block findable by its content."""
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self.cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block's content, so that no later request finds a prefix. Only while no request
        holds a block (a held block's content is in use): False, and nothing forgotten, otherwise."""
        if any(b.ref_count for b in self.blocks):
            return False
        for block in self.blocks:
            block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        self.cached.clear()
        return True

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference from each block; pass blocks tail-first so a sequence's tail is evicted first."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
