"""The next-token masks of a step's constrained requests, computed on a worker thread while the forward pass runs.

llguidance fills a bitmask (one bit per token) without holding the GIL, and the forward pass releases it too, so
the two overlap; the sampler waits only for whatever is left when the logits are ready.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch

from pernode.serve.sampling.structured.grammar import GrammarMatcher

_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


@dataclass
class TokenMasks:
    """Allowed next tokens for some rows of a step's sampled logits."""

    rows: list[int]  # which rows of the sampled logits these masks are for
    allowed: torch.Tensor  # bool [len(rows), mask_vocab]; columns past mask_vocab are never allowed

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed tokens' logits to -inf in place."""
        vocab = logits.shape[-1]
        width = min(vocab, self.allowed.shape[1])
        allowed = torch.zeros(len(self.rows), vocab, dtype=torch.bool, device=logits.device)
        allowed[:, :width] = self.allowed[:, :width].to(logits.device, non_blocking=True)
        index = torch.tensor(self.rows, dtype=torch.long, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words [rows, words] (bit j of word w = token 32 w + j) -> bool [rows, vocab_size]."""
    bits = (bitmask.unsqueeze(-1) >> _BIT_POSITIONS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def compute_masks(executor: llguidance.LLExecutor, matchers: list[GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """Allowed next tokens of each matcher, bool [len(matchers), vocab_size] (runs llguidance in parallel)."""
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
    executor.unsafe_compute_mask_ptr([(m.ll, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), words * 4,
                                     len(matchers))
    return unpack_bitmask(bitmask, vocab_size)


class MaskWorker:
    """One background thread that computes a step's masks while the model runs."""

    def __init__(self, vocab_size: int, num_threads: int | None = None):
        self.vocab_size = vocab_size
        # llguidance's own pool for the rows of one step; a little of the machine, since the forward pass is
        # running at the same time.
        threads = num_threads or max(1, min(4, (os.cpu_count() or 2) // 4))
        self._executor = llguidance.LLExecutor(num_threads=threads)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pernode-masks")

    def submit(self, rows: list[int], matchers: list[GrammarMatcher]) -> Future[TokenMasks]:
        """Start computing; the matchers must not change until the future is done."""
        return self._thread.submit(lambda: TokenMasks(rows, compute_masks(self._executor, matchers,
                                                                           self.vocab_size)))

    def close(self) -> None:
        self._thread.shutdown(wait=False)
