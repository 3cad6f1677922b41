"""Sequence-level knowledge distillation: Kim & Rush 2016, "Sequence-Level Knowledge Distillation" (arXiv
1606.07947). The student also trains on the teacher's own answers to chat prompts, generated once with pernode's
engine, because a draft model is judged on how often it predicts what the teacher says.

Prompts are built from the names of the stdlib modules in the training split (never from the evaluation text).
"""
from __future__ import annotations

import ast
import os
import random

from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams

PROMPT_FORMS = (
    "What is the Python module `{name}` used for?",
    "Show a short example that uses Python's `{name}` module.",
    "Explain in two sentences what `{name}` in the Python standard library does.",
    "Write a short Python function that uses `{name}`, with a docstring.",
    "List the pros and cons of using Python's `{name}` module.",
    "Explain `{name}` to a beginner, in simple terms.",
)
# Forms over the first paragraph of the module's own docstring: summarising and rewriting, the kind of reply a chat
# workload also asks for. Modules without a docstring fall back to PROMPT_FORMS.
DOCSTRING_FORMS = (
    "Summarize this in two sentences:\n\n{doc}",
    "Rewrite this paragraph for a ten-year-old reader:\n\n{doc}",
    "What does this documentation say? Answer in one paragraph:\n\n{doc}",
)
MAX_DOC_CHARS = 600


def module_doc(root: str, relative_path: str) -> str:
    """First paragraph of the module docstring (whitespace collapsed, at most MAX_DOC_CHARS), '' if none."""
    try:
        with open(os.path.join(root, relative_path), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph[:MAX_DOC_CHARS] if len(paragraph) >= 80 else ""


def chat_prompts(module_paths: list[str], count: int, seed: int = 0, root: str | None = None) -> list[str]:
    """`count` user prompts about stdlib modules (dotted names from relative .py paths), in a seeded order: every
    second prompt quotes the module's docstring (summarise / rewrite) when `root` (the stdlib folder) is given and
    the module has one, the others ask about the module by name."""
    paths = {p[:-3].replace(os.sep, ".").removesuffix(".__init__"): p for p in sorted(module_paths)
             if not os.path.basename(p).startswith("_") or p.endswith("__init__.py")}
    names = sorted(paths)
    rng = random.Random(seed)
    rng.shuffle(names)
    prompts = []
    for i in range(count if names else 0):
        name = names[i % len(names)]
        doc = module_doc(root, paths[name]) if root and i % 2 else ""
        prompts.append(DOCSTRING_FORMS[(i // 2) % len(DOCSTRING_FORMS)].format(doc=doc) if doc
                       else PROMPT_FORMS[i % len(PROMPT_FORMS)].format(name=name))
    return prompts


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
