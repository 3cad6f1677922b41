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
        query_start, seq_lens, slots = [0], [], []
        for s, (start, n) in enumerate(zip(num_cached, query_lens)):
            pos = np.arange(start, start + n)
            slots.append(tables[s, pos // block_size] * block_size + pos % block_size)
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
        return cls(query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
                   seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                   block_tables=torch.from_numpy(tables.astype(np.int32)).to(device),
                   slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
                   max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                   query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens)


def contiguous_block_tables(num_seqs: int, tokens_per_seq: int, block_size: int) -> torch.Tensor:
    """Block tables [S, blocks_per_seq] for S sequences laid one after another in a cache of their own: what
    evaluation and profiling use when no block pool is involved."""
    blocks_per_seq = -(-tokens_per_seq // block_size)
    return torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
