"""How many KV blocks the engine gets: `num_blocks` if set, else what `kv_cache_bytes` holds (default 2 GiB on
CPU, half the free memory on CUDA), and what that capacity means in sequences."""
from __future__ import annotations

import torch

from pernode.config import EngineConfig

DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return DEFAULT_CPU_KV_CACHE_BYTES


def num_kv_blocks(config: EngineConfig, kv_bytes_per_token: int, device: torch.device) -> int:
    """Blocks of `config.block_size` tokens the cache holds; ValueError naming kv_cache_bytes if not even one."""
    if config.num_blocks is not None:
        return config.num_blocks
    kv_bytes = config.kv_cache_bytes if config.kv_cache_bytes is not None else default_kv_cache_bytes(device)
    block_bytes = kv_bytes_per_token * config.block_size
    blocks = kv_bytes // block_bytes
    if blocks < 1:
        raise ValueError(f"kv_cache_bytes={kv_bytes} is too small: one block of {config.block_size} tokens needs "
                         f"{block_bytes} bytes")
    return int(blocks)
