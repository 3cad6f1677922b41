"""Log-probabilities in the three shapes the OpenAI-compatible routes send: completions' legacy `logprobs` (with echo,
prompt positions first), vLLM's `prompt_logprobs`, and chat's `logprobs.content`."""
from __future__ import annotations

import math

from pernode.serve.engine.outputs import TokenLogprob
from pernode.serve.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # JSON has no -inf; what vLLM sends for an impossible token


def json_logprob(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def _top_with_token(lp: TokenLogprob) -> dict[str, float]:
    """top_logprobs of one position: the N best, and the chosen token itself."""
    top = {t: json_logprob(v) for _, t, v in lp.top}
    top.setdefault(lp.token, json_logprob(lp.logprob))
    return top


def completion_logprobs(lps: list[TokenLogprob], offset: int, echo_strs: list[str],
                        prompt_lps: list[TokenLogprob | None] | None = None) -> tuple[dict, int]:
    """Completions' logprobs shape, and the text offset after it. With echo, prompt positions come first; the
    first prompt token has null (nothing precedes it), as in OpenAI and vLLM."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    echoed = [(tok, prompt_lps[i] if prompt_lps is not None and i < len(prompt_lps) else None)
              for i, tok in enumerate(echo_strs)]
    for tok, lp in echoed + [(lp.token, lp) for lp in lps]:
        out["tokens"].append(tok)
        out["token_logprobs"].append(None if lp is None else json_logprob(lp.logprob))
        out["top_logprobs"].append(None if lp is None else _top_with_token(lp))
        out["text_offset"].append(offset)
        offset += len(tok)
    return out, offset


def vllm_prompt_logprobs(lps: list[TokenLogprob | None] | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, token id -> {logprob, decoded_token}, None for the first."""
    if lps is None:
        return None
    out: list[dict | None] = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": json_logprob(v), "decoded_token": s} for t, s, v in lp.top}
        entry[str(lp.token_id)] = {"logprob": json_logprob(lp.logprob), "decoded_token": lp.token}
        out.append(entry)
    return out


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob] | None) -> dict:
    def entry(token_id: int, token: str, logprob: float) -> dict:
        # an id of the model's padded vocabulary has no token: empty text, bytes null (as vLLM)
        raw = list(tokenizer.token_to_bytes(token_id)) if token_id < tokenizer.vocab_size else None
        return {"token": token, "logprob": json_logprob(logprob), "bytes": raw}

    return {"content": [{**entry(lp.token_id, lp.token, lp.logprob),
                         "top_logprobs": [entry(t, s, v) for t, s, v in lp.top]} for lp in lps or []]}
