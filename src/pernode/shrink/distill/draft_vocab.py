"""The frequency-ranked token subset a draft scores (FR-Spec: Zhao et al. 2025, arXiv 2502.14856): the N tokens that
occur most often in the teacher's own generations and the training text, written as `draft_vocab.json` beside the
draft's weights, where the engine's draft proposer finds it (serve/engine/spec_decode/draft_vocab.py).

The teacher's replies are what a draft must predict, so their counts weigh `reply_weight` times a training-text
token's. The end-of-sequence and chat-template tokens are always kept: a draft that cannot propose the end of a
reply, or the template's markers, would lose every step there.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable

from pernode.serve.engine.spec_decode.draft_vocab import DRAFT_VOCAB_FILE
from pernode.serve.models.registry import resolve_model
from pernode.shrink.distill.data import distillation_text, is_heldout, stdlib_files
from pernode.shrink.distill.sequence_kd import chat_prompts, teacher_generations


def count_tokens(replies: Iterable[Iterable[int]], text: Iterable[Iterable[int]], reply_weight: int = 4) -> Counter:
    counts: Counter = Counter()
    for seq in replies:
        for t in seq:
            counts[t] += reply_weight
    for seq in text:
        counts.update(seq)
    return counts


def select_draft_vocab(counts: Counter, size: int, vocab_size: int, always: Iterable[int] = ()) -> list[int]:
    """The `size` most frequent ids (ties by id), `always` included first; ValueError naming size if out of range."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft_vocab size={size} is out of range: allowed 1..{vocab_size}")
    keep = list(dict.fromkeys(t for t in always if 0 <= t < vocab_size))[:size]
    chosen = set(keep)
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) >= size:
            break
        if token not in chosen and 0 <= token < vocab_size:
            keep.append(token)
            chosen.add(token)
    return sorted(keep)


def coverage(token_ids: Iterable[int], sequences: Iterable[Iterable[int]]) -> float:
    """Share of the tokens of `sequences` that lie inside the subset (how often the draft can be right at all)."""
    subset = set(token_ids)
    total = hits = 0
    for seq in sequences:
        for t in seq:
            total += 1
            hits += t in subset
    return hits / total if total else 0.0


def write_draft_vocab(folder: str, token_ids: list[int], details: dict | None = None) -> str:
    path = os.path.join(folder, DRAFT_VOCAB_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"size": len(token_ids), **(details or {}), "token_ids": token_ids}, f)
    return path


def special_token_ids(tokenizer) -> list[int]:
    """EOS ids and the tokens a chat template emits around a reply."""
    ids = list(getattr(tokenizer, "stop_token_ids", []) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(int(eos))
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant",
                                                                                    "content": "y"}])
        ids += tokenizer.encode(rendered, add_special_tokens=False)
    except (AttributeError, KeyError, ValueError):  # a tokenizer without a chat template: its EOS is enough
        pass
    return list(dict.fromkeys(int(t) for t in ids))


def build_draft_vocab(teacher_model: str, draft_folder: str, size: int, num_prompts: int = 64,
                      max_tokens: int = 128, text_chars: int = 2_000_000, seed: int = 0, log=print) -> dict:
    """Count tokens in the teacher's replies to chat prompts (training-split stdlib modules, as sequence-level KD
    uses) and in training text, keep the `size` most frequent, write `draft_folder/draft_vocab.json`."""
    source = resolve_model(teacher_model)
    tokenizer = source.tokenizer
    prompts = chat_prompts([p for p in stdlib_files() if not is_heldout(p)], num_prompts, seed)
    log(f"draft vocabulary: the teacher answers {len(prompts)} chat prompts")
    replies = teacher_generations(teacher_model, prompts, max_tokens)
    text = distillation_text(text_chars, heldout_chars=0, seed=seed)
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in text.train]
    counts = count_tokens(replies, docs)
    vocab_size = source.config.vocab_size
    ids = select_draft_vocab(counts, size, vocab_size, special_token_ids(tokenizer))
    details = {"source": f"token counts: the teacher's greedy replies to {len(replies)} chat prompts (x4) and "
                         f"{sum(map(len, text.train)):,} characters of training text (pydoc calibration part, "
                         "training-split stdlib files)",
               "reply_coverage": round(coverage(ids, replies), 4), "text_coverage": round(coverage(ids, docs), 4)}
    write_draft_vocab(draft_folder, ids, details)
    log(f"wrote {size} tokens: they cover {details['reply_coverage']:.1%} of the replies' tokens, "
        f"{details['text_coverage']:.1%} of the text's")
    return details
