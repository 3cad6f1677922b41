"""The prompts `pernode bench serve` sends: random lengths, a JSONL file, or a built-in chat-like mix.

Random prompts are made of common English words that are one token each (with their leading space) in the
GPT-2, Llama, Mistral, Qwen2 and SmolLM vocabularies, so a prompt of N words is close to N tokens without a
tokenizer at hand. Given a tokenizer (`tokenizer.json`), the word count is corrected until the token count is
exact. Either way the server's `usage.prompt_tokens`, when it sends one, is what the metrics count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tokenizers import Tokenizer

from pernode.serve.models.gguf_file import GGUFFile
from pernode.serve.tokenizer import Tokenizer as GGUFTokenizer
from pernode.records import estimate_tokens, iter_jsonl

DATASETS = ("random", "jsonl", "chat")

# Short, frequent words: each is a single BPE token with its leading space in the vocabularies above.
ONE_TOKEN_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an had "
    "they you were their one all we can her has there been if more when will would who so no time people year way "
    "day man thing woman life child world school state family group country problem hand part place case week "
    "company system program question work number night point home water room mother area money story fact month "
    "lot right study book eye job word business issue side kind head house service friend father power hour game "
    "line end member law car city name team minute idea body back parent face level office door health person art "
    "war history party result change morning reason girl moment air teacher force old new good first last long "
    "great little own other big high small large next early young important few public bad same able best better "
    "sure free true whole real full late hard open short clear black white red blue green light dark cold hot "
    "make go know take see come think look want give use find tell ask seem feel try leave call keep let begin "
    "help show hear play run move live hold bring write stand lose pay meet sit speak lead read grow walk win"
).split()

Tokenize = Callable[[str], Sequence[int]]


@dataclass
class BenchRequest:
    """One request to send. Exactly one of `prompt` (completions) or `messages` (chat) is set."""

    prompt: str | None
    messages: list[dict] | None
    prompt_len: int  # tokens: exact with a tokenizer, else an estimate (the server's usage wins when given)
    max_tokens: int

    @property
    def endpoint(self) -> str:
        return "chat" if self.messages is not None else "completions"


def load_tokenizer(path: str | os.PathLike) -> Tokenize:
    """A `text -> token ids` function from a Hugging Face `tokenizer.json` (or a folder holding one) or a .gguf."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        gguf_tok = GGUFTokenizer.from_gguf(GGUFFile(str(p)))
        return lambda text: gguf_tok.encode(text, add_special_tokens=False)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer={str(path)!r}: no tokenizer.json there; pass the file, its folder or a .gguf")
    tok = Tokenizer.from_file(str(p))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def word_prompt(rng: np.random.Generator, num_tokens: int, tokenize: Tokenize | None = None) -> tuple[str, int]:
    """A prompt of about `num_tokens` tokens and its token count (exact with `tokenize`, else the word count)."""
    words = [ONE_TOKEN_WORDS[i] for i in rng.integers(0, len(ONE_TOKEN_WORDS), size=num_tokens)]
    text = " " + " ".join(words)
    if tokenize is None:
        return text, num_tokens
    # A few words can split in some vocabulary; nudge the word count until the token count is right.
    for _ in range(8):
        n = len(tokenize(text))
        if n == num_tokens or not words:
            break
        if n > num_tokens:
            words = words[: max(1, len(words) - (n - num_tokens))]
        else:
            extra = rng.integers(0, len(ONE_TOKEN_WORDS), size=num_tokens - n)
            words += [ONE_TOKEN_WORDS[i] for i in extra]
        text = " " + " ".join(words)
    return text, len(tokenize(text))


def random_requests(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int = 0, tokenize: Tokenize | None = None) -> list[BenchRequest]:
    """Prompts with lengths uniform in `input_len` and max_tokens uniform in `output_len` (inclusive)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_prompts):
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        text, n_tok = word_prompt(rng, n_in, tokenize)
        out.append(BenchRequest(prompt=text, messages=None, prompt_len=n_tok, max_tokens=n_out))
    return out


def _messages_len(messages: list[dict], tokenize: Tokenize | None) -> int:
    count = (lambda s: len(tokenize(s))) if tokenize else estimate_tokens
    # ~4 tokens of chat-template framing per message (role markers, separators).
    return sum(count(str(m.get("content", ""))) + 4 for m in messages)


def jsonl_requests(path: str | os.PathLike, num_prompts: int, default_max_tokens: int = 256,
                   tokenize: Tokenize | None = None) -> list[BenchRequest]:
    """Read `{"prompt": str, "max_tokens": int}` or `{"messages": [...], "max_tokens": int}` lines, in order.

    Takes the first `num_prompts` lines and cycles the file if it is shorter, so a run is reproducible.
    """
    rows: list[BenchRequest] = []
    for where, obj in iter_jsonl(path):
        max_tokens = obj.get("max_tokens", default_max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{where}: max_tokens = {max_tokens!r}: must be an integer >= 1")
        if isinstance(obj.get("prompt"), str):
            p = obj["prompt"]
            n = len(tokenize(p)) if tokenize else estimate_tokens(p)
            rows.append(BenchRequest(prompt=p, messages=None, prompt_len=n, max_tokens=max_tokens))
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise ValueError(f"{where}: messages must be a list of {{'role': ..., 'content': ...}}")
            rows.append(BenchRequest(prompt=None, messages=msgs, prompt_len=_messages_len(msgs, tokenize),
                                     max_tokens=max_tokens))
        else:
            raise ValueError(f"{where}: needs a string 'prompt' or a non-empty list 'messages'")
    if not rows:
        raise ValueError(f"dataset_path={str(path)!r}: the file has no requests")
    return [rows[i % len(rows)] for i in range(num_prompts)]


# A chat-like mix: short questions with short answers, explanations, rewriting of a pasted paragraph and code
# questions; the max_tokens mirror what such turns produce. Served through /v1/chat/completions.
_PARAGRAPH = (
    "The city council met on Tuesday to discuss the budget for the next fiscal year. Members debated whether to "
    "increase funding for public transport, which has seen ridership grow by twelve percent since the new routes "
    "opened, or to direct the money toward road repairs after a harsh winter left many streets damaged. Several "
    "residents spoke during the public comment period, most of them in favour of more frequent buses on weekends. "
    "The council agreed to hold a second meeting next month before voting on the final plan."
)
CHAT_MIX: tuple[tuple[str, int], ...] = (
    ("What is the capital of Australia?", 32),
    ("Give me three names for a grey cat.", 48),
    ("How many minutes are there in a week? Show the arithmetic.", 96),
    ("Explain in simple terms why the sky is blue.", 256),
    ("What is the difference between a list and a tuple in Python?", 256),
    ("Write a short, friendly email asking a colleague to review my pull request by Friday.", 192),
    ("Summarize this in two sentences:\n\n" + _PARAGRAPH, 96),
    ("Rewrite this paragraph for a ten-year-old reader:\n\n" + _PARAGRAPH, 256),
    ("List the pros and cons of working from home as a table.", 384),
    ("Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.", 256),
    ("What does HTTP status code 429 mean and how should a client react to it?", 192),
    ("Translate to French: 'The meeting has been moved to Thursday afternoon.'", 48),
    ("Plan a three-day trip to Kyoto for someone who likes gardens and food.", 512),
    ("Why does ice float on water?", 160),
    ("Write a haiku about autumn rain.", 40),
    ("Explain what a hash table is, how collisions are handled, and the cost of lookups.", 512),
)


def chat_requests(num_prompts: int, seed: int = 0, tokenize: Tokenize | None = None) -> list[BenchRequest]:
    """`num_prompts` turns drawn (with replacement, seeded) from CHAT_MIX."""
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(CHAT_MIX), size=num_prompts):
        text, max_tokens = CHAT_MIX[int(i)]
        msgs = [{"role": "user", "content": text}]
        out.append(BenchRequest(prompt=None, messages=msgs, prompt_len=_messages_len(msgs, tokenize),
                                max_tokens=max_tokens))
    return out
