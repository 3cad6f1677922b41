"""The grammar engine's view of our tokenizer: each token id mapped to its raw bytes (a byte-level BPE token is
exactly its bytes; special tokens are marked so a grammar can never spell them out of text)."""
from __future__ import annotations

from collections.abc import Sequence

import llguidance

from pernode.serve.tokenizer import Tokenizer

# llguidance's convention for a special token's entry: 0xFF (never a byte of UTF-8 text) then its name.
SPECIAL_TOKEN_PREFIX = b"\xff"


def token_bytes_table(tokenizer: Tokenizer) -> list[bytes]:
    """Raw bytes of every token id in [0, tokenizer.vocab_size), special tokens prefixed with 0xFF."""
    special = set(tokenizer.backend.get_added_tokens_decoder())
    table = []
    for token_id in range(tokenizer.vocab_size):
        raw = tokenizer.token_to_bytes(token_id)
        table.append(SPECIAL_TOKEN_PREFIX + raw if token_id in special else raw)
    return table


class _TokenizerForGrammar:
    """The duck type llguidance's TokenizerWrapper reads: token bytes, eos/bos ids, and text -> ids."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int):
        self._tokenizer = tokenizer
        self.tokens = token_bytes_table(tokenizer)
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(tokenizer.backend.get_added_tokens_decoder())

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def grammar_tokenizer(tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """An llguidance tokenizer over our vocabulary (about a second for 50k tokens: build once per engine).
    `eos_token_ids` are the tokens a finished grammar lets through (the model's eos and end-of-turn tokens)."""
    ids = [t for t in eos_token_ids if 0 <= t < tokenizer.vocab_size]
    if not ids:
        raise ValueError("structured outputs need an eos token id inside the tokenizer's vocabulary")
    wrapper = llguidance.TokenizerWrapper(_TokenizerForGrammar(tokenizer, ids[0]))
    return llguidance.LLTokenizer(wrapper, eos_token=ids)
