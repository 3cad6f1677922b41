"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's last n tokens.

Prompt lookup decoding (Saxena 2023) / n-gram speculation as in vLLM; no model, so it costs microseconds and
shines where the output copies the input (editing, summarising, code).
"""
from __future__ import annotations

import numpy as np

from pernode.serve.engine.request import Request
from pernode.serve.engine.spec_decode.proposal import Proposal


def find_continuation(token_ids: np.ndarray, ngram_min: int, ngram_max: int, k: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the sequence's last n tokens that has k tokens after
    it (else the match with the most), trying the longest n first (a longer match is stronger evidence); [] when
    no suffix of ngram_min..ngram_max tokens recurs. In a repeating stretch the latest match sits right before
    the end and would offer one token where the period offers k."""
    length = len(token_ids)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = token_ids[length - n:]
        # windows start at 0..length-n-1: each has at least one token after it, and the suffix itself is excluded
        windows = np.lib.stride_tricks.sliding_window_view(token_ids[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= length]
            start = int(full[-1] if full.size else hits[0]) + n
            return token_ids[start:start + k].tolist()
    return []


class NgramProposer:
    needs_blocks_ahead = False  # proposes without writing any K/V

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[Proposal]:
        out = []
        for request, k in zip(requests, num_tokens):
            tokens = find_continuation(np.asarray(request.all_token_ids, dtype=np.int64), self.ngram_min,
                                       self.ngram_max, k) if k else []
            out.append(Proposal(tokens))
        return out

    def forget(self, request_id: str) -> None:
        pass
