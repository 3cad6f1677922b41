"""Sequence-level knowledge distillation: Kim & Rush 2016, "Sequence-Level Knowledge Distillation" (arXiv
1606.07947). The student also trains on the teacher's own answers to chat prompts, generated once with pernode's
engine, because a draft model is judged on how often it predicts what the teacher says.

Prompts are built from the names of the stdlib modules in the training split (never from the evaluation text).
"""
from __future__ import annotations

import os
import random

from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams

PROMPT_FORMS = (
    "What is the Python module `{name}` used for?",
    "Show a short example that uses Python's `{name}` module.",
    "Explain in two sentences what `{name}` in the Python standard library does.",
)


def chat_prompts(module_paths: list[str], count: int, seed: int = 0) -> list[str]:
    """`count` user prompts about stdlib modules (dotted names from relative .py paths), in a seeded order."""
    names = sorted({p[:-3].replace(os.sep, ".").removesuffix(".__init__") for p in module_paths
                    if not os.path.basename(p).startswith("_") or p.endswith("__init__.py")})
    rng = random.Random(seed)
    rng.shuffle(names)
    return [PROMPT_FORMS[i % len(PROMPT_FORMS)].format(name=names[i % len(names)]) for i in range(count)] if names else []


def teacher_generations(teacher_model: str, prompts: list[str], max_tokens: int = 128, temperature: float = 0.0,
                        seed: int = 0, dtype: str | None = None) -> list[list[int]]:
    """Token ids of each chat-formatted prompt followed by the teacher's reply (greedy at temperature 0, else
    sampled with per-request seeds): the sequences the student is trained on."""
    if not prompts:
        return []
    llm = LLM(teacher_model, dtype=dtype, enable_prefix_caching=True)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    rendered = [llm.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
              for i in range(len(prompts))]
    outputs = llm.generate(rendered, params, use_tqdm=True)
    sequences = []
    for prompt_text, out in zip(rendered, outputs):
        if out.error:
            continue
        sequences.append(list(out.prompt_token_ids) + list(out.outputs[0].token_ids))
    return sequences
