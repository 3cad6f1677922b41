"""Where each sequence's queries and cached keys live for one forward step: the layout every attention path
(the C++ kernel, SDPA, the reference) and every caller (engine, evaluation, profiling) shares."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


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
        # vectorised over all tokens at once: a Python loop per sequence cost ~10 us each at batch 32+
        query_lens = np.asarray(query_lens, dtype=np.int64)
        num_cached = np.asarray(num_cached, dtype=np.int64)
        query_start = np.zeros(len(query_lens) + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        seq_lens = num_cached + query_lens
        seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
        pos = token_positions(num_cached, query_lens)
        slots = tables[seq_of_token, pos // block_size] * block_size + pos % block_size
        return cls(query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(device),
                   seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
                   block_tables=torch.from_numpy(tables.astype(np.int32)).to(device),
                   slot_mapping=torch.from_numpy(slots).to(device),
                   max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
                   query_start_loc_cpu=query_start.tolist(), seq_lens_cpu=seq_lens.tolist())


def token_positions(num_cached: Sequence[int] | np.ndarray, query_lens: Sequence[int] | np.ndarray) -> np.ndarray:
    """[T] int64: the position of each new token, sequences end to end (sequence s: num_cached[s] + 0..len-1)."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    starts = np.asarray(num_cached, dtype=np.int64) - (np.cumsum(query_lens) - query_lens)
    return np.arange(int(query_lens.sum()), dtype=np.int64) + np.repeat(starts, query_lens)


def contiguous_block_tables(num_seqs: int, tokens_per_seq: int, block_size: int) -> torch.Tensor:
    """Block tables [S, blocks_per_seq] for S sequences laid one after another in a cache of their own: what
    evaluation and profiling use when no block pool is involved."""
    blocks_per_seq = -(-tokens_per_seq // block_size)
    return torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
