"""The served model's greedy replies to chat prompts, generated once and kept in a JSON file.

Generating replies is the slow part of training a draft on CPU (minutes per thousand prompts), so they are kept
per prompt, keyed by the model, its compute dtype and the reply budget: a run with more prompts only generates the
new ones, and an interrupted run resumes from the last chunk written. JSON of token ids only: no pickle.
"""
from __future__ import annotations

import json
import os

import torch

from pernode.serve.engine.llm_engine import resolve_dtype
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams

CHUNK = 128  # prompts generated (and written) at a time


def _load(path: str | None, key: dict) -> dict[str, list[int]]:
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("key") != key:  # another model, dtype or budget: those replies are not these
        return {}
    return {p: list(ids) for p, ids in data.get("replies", {}).items()}


def _save(path: str, key: dict, replies: dict[str, list[int]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "replies": replies}, f)
    os.replace(tmp, path)


def greedy_replies(model: str, prompts: list[str], max_tokens: int, cache: str | None = None,
                   dtype: str | None = None, log=print) -> list[list[int]]:
    """For each prompt, the token ids of its chat-formatted form followed by the model's greedy reply (pernode's
    engine, `dtype` or its default), in prompt order; replies already in `cache` are reused."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is out of range: allowed >= 1")
    replies: dict[str, list[int]] = {}
    missing = list(prompts)
    key = None
    if cache:  # the key needs only the dtype the engine would pick: no engine is built when every reply is cached
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        key = {"model": os.path.abspath(model) if os.path.exists(model) else model,
               "dtype": str(resolve_dtype(dtype, device)), "max_tokens": max_tokens}
        replies = _load(cache, key)
        missing = [p for p in dict.fromkeys(prompts) if p not in replies]
        log(f"reply cache {cache}: {len(prompts) - len(missing)} of {len(prompts)} prompts already answered")
    if missing:
        llm = LLM(model, dtype=dtype, enable_prefix_caching=True)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start:start + CHUNK]
            rendered = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                          add_generation_prompt=True) for p in chunk]
            outputs = llm.generate(rendered, [params] * len(chunk), use_tqdm=True)
            for prompt, out in zip(chunk, outputs):
                if out.error:
                    raise RuntimeError(f"the served model failed on a training prompt: {out.error}")
                replies[prompt] = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
            if cache:
                _save(cache, key, replies)
            log(f"answered {min(start + CHUNK, len(missing))} of {len(missing)} new prompts")
    return [replies[p] for p in prompts]
