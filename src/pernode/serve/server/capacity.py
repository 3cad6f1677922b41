"""The start-time check that the KV cache holds one sequence of max_model_len (vLLM fails at start on this; a
server that found it at request time would refuse every chat without max_tokens)."""
from __future__ import annotations

import logging

from pernode.serve.engine.llm_engine import LLMEngine

log = logging.getLogger("pernode.serve.server")


def fit_context(engine: LLMEngine) -> None:
    """When the cache holds fewer tokens than max_model_len: lower max_model_len to what it holds if it was not set
    (the model's own context; logged), else ValueError naming max_model_len and the cache's settings."""
    capacity = engine.num_blocks * engine.block_size
    if capacity >= engine.max_model_len:
        return
    cache = (f"num_blocks={engine.num_blocks} x block_size={engine.block_size} = {capacity} tokens, "
             f"kv_cache_bytes={engine.kv_cache_bytes}")
    if engine.config.max_model_len is not None or capacity < 2:
        raise ValueError(f"max_model_len={engine.max_model_len} does not fit the KV cache ({cache}): not one "
                         f"sequence of max_model_len fits; lower max_model_len to at most {capacity} or enlarge the "
                         f"cache (kv_cache_bytes or num_blocks)")
    log.warning("max_model_len lowered from %d (the model's context) to %d: the KV cache holds no more (%s); set "
                "kv_cache_bytes or num_blocks for a longer context", engine.max_model_len, capacity, cache)
    engine.limit_max_model_len(capacity)
