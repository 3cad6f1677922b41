"""Per-request sampling parameters, validated where they enter (vLLM's `SamplingParams` shape)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pernode.serve.sampling.structured.spec import StructuredOutputs

MAX_LOGPROBS = 20
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's: -100 bans a token, +100 all but forces it


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: allowed {allowed}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0, OpenAI-style "off") means all tokens
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token, besides the sampled one
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # top-N alternatives per prompt token, besides the prompt's own (vLLM)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI)
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM)
    structured_outputs: StructuredOutputs | None = None  # constrained decoding (JSON schema, regex, grammar...)
    # stop_token_ids as a set, for the engine's check of every generated token (set again by validate())
    stop_token_id_set: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.stop is None or isinstance(self.stop, (list, tuple)), "stop", self.stop,
               "a string or a list of non-empty strings")
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               self.stop_token_ids, "a list of token ids >= 0")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    def validate(self) -> None:
        def finite(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(finite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a number >= 0 (0 means greedy)")
        _check(finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "(0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", self.top_k,
               "-1 or 0 (disabled) or an integer >= 1")
        _check(finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "[0, 1]")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed", self.seed,
               "None or an integer in [0, 2**63)")
        _check(finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
               self.presence_penalty, "[-2, 2]")
        _check(finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
               self.frequency_penalty, "[-2, 2]")
        _check(finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
               self.repetition_penalty, "(0, 10]")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "None or an integer >= 1")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "an integer >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"<= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of token ids >= 0")
        _check(self.prompt_logprobs is None
               or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", self.prompt_logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")
        self._validate_token_constraints()
        self.stop_token_id_set = frozenset(self.stop_token_ids)

    def _validate_token_constraints(self) -> None:
        low, high = LOGIT_BIAS_RANGE
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
                   "a mapping of token id -> bias")
            for token_id, bias in self.logit_bias.items():
                _check(isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0,
                       "logit_bias", token_id, "token ids >= 0 as keys")
                _check(isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
                       and low <= bias <= high, f"logit_bias[{token_id}]", bias, f"[{low:g}, {high:g}]")
        if self.allowed_token_ids is not None:
            _check(isinstance(self.allowed_token_ids, (list, tuple)) and len(self.allowed_token_ids) > 0
                   and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.allowed_token_ids),
                   "allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids >= 0")
            self.allowed_token_ids = list(self.allowed_token_ids)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs", self.structured_outputs, "None or a StructuredOutputs")

    def check_token_ids(self, vocab_size: int) -> None:
        """ValueError when logit_bias or allowed_token_ids name a token outside [0, vocab_size)."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("allowed_token_ids", self.allowed_token_ids or [])):
            bad = [t for t in ids if t >= vocab_size]
            _check(not bad, name, bad[:1] and bad[0], f"token ids in [0, {vocab_size})")

    @property
    def constrains_tokens(self) -> bool:
        """Whether the logits are changed before sampling (bias, allowed ids or a grammar)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or self.structured_outputs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
