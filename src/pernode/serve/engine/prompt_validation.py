"""A prompt checked before it reaches the scheduler: not empty, token ids in the vocabulary, and room for it and
its max_tokens in the context and in the KV cache. Errors name the field and what is allowed."""
from __future__ import annotations

from pernode.serve.engine.kv_cache_manager import KVCacheManager
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.tokenizer import Tokenizer


class PromptValidator:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, kv: KVCacheManager):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv = kv

    def __call__(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids; ValueError if the request could never run."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token id")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = self.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]!r} is out of range: allowed integers in [0, {vocab})")
        params.check_token_ids(self.vocab_size)
        if not token_ids:
            raise ValueError("prompt is empty: give at least one character or token id")
        n, max_len = len(token_ids), self.max_model_len
        if n >= max_len:
            raise ValueError(f"prompt has {n} tokens; max_model_len is {max_len}: allowed at most {max_len - 1} "
                             f"prompt tokens")
        if params.max_tokens is not None and n + params.max_tokens > max_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} "
                             f"exceeds max_model_len ({max_len}): allowed max_tokens <= {max_len - n}")
        need = self.kv.blocks_needed(n + (params.max_tokens or max_len - n))
        num_blocks = self.kv.pool.num_blocks
        if need > num_blocks:
            raise ValueError(f"this request alone needs {need} KV blocks but the cache has {num_blocks}: lower "
                             f"max_tokens or enlarge the cache (settings kv_cache_bytes or num_blocks)")
        return token_ids
