"""Constrained decoding with llguidance: a request's `StructuredOutputs` compiled to a grammar, and one matcher per
sample that says which tokens may come next (Earley parsing over a lexer of derivative-based regexes; Moskal et
al., "llguidance", 2025; the token-mask idea is Willard & Louf, arXiv:2307.09702).

Why llguidance rather than outlines-core (both measured in docs/structured_outputs.md): outlines-core compiles a
regex to a token automaton, so it covers JSON schemas that reduce to a regex and nothing recursive (no "any JSON
object", no Lark/GBNF grammars), while llguidance parses context-free grammars, so one engine covers every kind
vLLM takes; on our 49,152-token vocabulary both compile a small schema in tens of milliseconds or less and give a
mask in microseconds.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

from pernode.serve.sampling.structured.spec import StructuredOutputs
from pernode.serve.sampling.structured.token_table import grammar_tokenizer
from pernode.serve.tokenizer import Tokenizer

# Compact JSON as json.dumps writes it: models have seen it most, and no whitespace runs a weak model can loop in.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 200_000


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar for a constraint; ValueError naming the field when it cannot be built."""
    kind, name = spec.kind, spec.field_name
    try:
        if kind == "json":
            schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            # JSON string literals are Lark string literals
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        text = spec.grammar
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{len(text)} characters, allowed at most {MAX_GRAMMAR_CHARS}")
        if "::=" in text:  # GBNF (llama.cpp) rules; Lark uses ':'
            text = gbnf_to_lark(text)
        return llguidance.LLMatcher.grammar_from_lark(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"{name} is invalid: {exc}") from None
    except Exception as exc:  # the GBNF converter raises its own errors
        raise ValueError(f"{name} is invalid: {type(exc).__name__}: {exc}") from None


class GrammarMatcher:
    """One sample's position in its grammar: which tokens may come next, and the tokens taken so far.

    `accept_proposed` / `rollback` are the hook for speculative decoding: take the longest grammatical prefix of
    proposed tokens, then undo what the verifier rejects."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.ll = matcher
        self.num_accepted = 0

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the matcher is dead) if the grammar does not allow it."""
        ok = self.ll.consume_token(token_id)
        self.num_accepted += ok
        return ok

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of `token_ids` the grammar allows from here; the state does not change."""
        return self.ll.validate_tokens(list(token_ids))

    def accept_proposed(self, token_ids: Sequence[int]) -> int:
        """Take the longest allowed prefix of proposed (draft) tokens; returns how many were taken."""
        n = self.validate_tokens(token_ids)
        if n and not self.ll.consume_tokens(list(token_ids[:n])):
            raise RuntimeError(f"grammar matcher refused tokens it validated: {self.ll.get_error()}")
        self.num_accepted += n
        return n

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected draft tokens)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"num_tokens={num_tokens} is out of range: allowed 0..{self.num_accepted}")
        if num_tokens and not self.ll.rollback(num_tokens):
            raise RuntimeError(f"grammar matcher could not roll back {num_tokens} tokens: {self.ll.get_error()}")
        self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing but the end (or the matcher failed)."""
        return self.ll.is_stopped()

    @property
    def error(self) -> str:
        return self.ll.get_error()


class GrammarCompiler:
    """Builds matchers for one tokenizer. The llguidance tokenizer (~0.2 s) is built on first use, once."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id else [])
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # the server validates on worker threads
            if self._ll_tokenizer is None:
                self._ll_tokenizer = grammar_tokenizer(self.tokenizer, self.eos_token_ids)
            return self._ll_tokenizer

    @property
    def vocab_size(self) -> int:
        return self.ll_tokenizer.vocab_size

    def validate(self, spec: StructuredOutputs) -> str:
        """The grammar text; ValueError naming the field if the grammar engine rejects it."""
        text = grammar_text(spec)
        error = llguidance.LLMatcher.validate_grammar(text, self.ll_tokenizer)
        if error:
            raise ValueError(f"{spec.field_name} is invalid: {error.strip().splitlines()[0]}")
        return text

    def matchers(self, spec: StructuredOutputs, count: int = 1) -> list[GrammarMatcher]:
        """`count` matchers at the grammar's start (one compile, then copies); ValueError naming the field."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            message = matcher.get_error().strip().splitlines()
            raise ValueError(f"{spec.field_name} is invalid: {message[0] if message else 'unknown error'}")
        return [GrammarMatcher(matcher)] + [GrammarMatcher(matcher.deep_copy()) for _ in range(count - 1)]

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        return self.matchers(spec)[0]
