"""Tokenizer: the default model's GGUF tokenizer against transformers' (encode, decode, chat template), and the
incremental detokenizer (deltas add up to the full decode, never half a character, constant cost per token)."""
from __future__ import annotations

import jinja2
import pytest
import tokenizers

from pernode.serve.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, résumé; Ångström, façade, Œuvre, straße",
    "中文分词测试：你好，世界！日本語のテキストも。한국어 문장",
    "مرحبا بالعالم — שלום עולם",  # right-to-left scripts
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\nclass A: pass",
    "    four leading spaces, then   three,\t\ttabs\r\n and trailing   ",
    "\n\n\n\t \t\n",
    "emoji 🤗🙂👍🏽 and a family 👨‍👩‍👧‍👦 and a flag 🇫🇷 ❤️",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-06-01",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <repo_name> too",
    "don't won't I'm we've they'll she'd IT'S",
    "",
    "a",
    " ",
    "Zalgo: Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ → ∞",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "Translate 'chat' to français."}],
]


@pytest.fixture(scope="module")
def tokenizer(default_model_source) -> Tokenizer:
    return default_model_source.tokenizer  # Tokenizer.from_gguf, shared with other tests


def test_special_ids_and_size(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.stop_token_ids == [2]  # <|im_end|> is the eos already
    assert tokenizer.encode("<|im_start|>") == [1]  # special text maps whole
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode("hello", add_special_tokens=False)


def test_digits_are_split(tokenizer):
    # SmolLM's pre-tokenizer (tokenizer.ggml.pre = "smollm") puts every digit in its own token.
    assert [tokenizer.decode([i]) for i in tokenizer.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_round_trip(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_token_to_str_and_bytes(tokenizer):
    ids = tokenizer.encode(" 🤗")
    assert b"".join(tokenizer.token_to_bytes(i) for i in ids) == " 🤗".encode()
    assert tokenizer.token_to_str(tokenizer.encode(" hello")[0]) == " hello"
    assert tokenizer.token_to_str(2) == "<|im_end|>"
    with pytest.raises(ValueError, match="token_id 99999"):
        tokenizer.token_to_bytes(99999)


@pytest.mark.slow
def test_encode_decode_equal_transformers(tokenizer, hf_reference_tokenizer):
    hf = hf_reference_tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


@pytest.mark.slow
def test_chat_template_equal_transformers(tokenizer, hf_reference_tokenizer):
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = hf_reference_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def _tiny_tokenizer(chat_template: str | None) -> Tokenizer:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    return Tokenizer(backend, eos_token="</s>", chat_template=chat_template)


def test_chat_template_helpers_and_sandbox():
    tok = _tiny_tokenizer(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] | tojson }}{% generation %}{{ eos_token }}{% endgeneration %}"
        "{% endfor %}{% if bos_token is defined %}BOS{% endif %}"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"</s>'  # no ASCII escaping, no bos
    with pytest.raises(jinja2.TemplateError, match="first message must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    escape = _tiny_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        escape.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat_template"):
        _tiny_tokenizer(None).apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------------------
# Incremental detokenization


def _stream(tokenizer, ids, prompt_ids=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


def test_deltas_add_up_to_full_decode(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for text in TEXTS + ["<|im_start|>ok<|im_end|> done"]:
        ids = tokenizer.encode(text)
        for skip in (True, False):
            deltas = _stream(tokenizer, ids, prompt, skip_special_tokens=skip)
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip), text


def test_no_half_characters(tokenizer):
    for text in ["🤗🙂👍🏽👨‍👩‍👧‍👦🇫🇷", "中文分词测试你好世界", "😀" * 20, "a🤗b中c"]:
        ids = tokenizer.encode(text)
        assert any("\ufffd" in tokenizer.token_to_str(i) for i in ids)  # some tokens hold part of a character
        deltas = _stream(tokenizer, ids)
        assert not any("\ufffd" in d for d in deltas), deltas
        assert "".join(deltas) == text


def test_push_several_tokens_at_once(tokenizer):
    ids = tokenizer.encode("speculative 🤗 tokens arrive in groups")
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(ids[i:i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert text == tokenizer.decode(ids)


class _CountingTokenizer:
    """Wraps a Tokenizer and counts how many ids each decode call sees."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.decoded_ids = inner, []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_ids.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def test_cost_per_token_does_not_grow(tokenizer):
    ids = tokenizer.encode("word " * 2000 + "🤗 " * 200)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, prompt_ids=list(range(3, 1000)))
    for i in ids:
        detok.push([i])
    assert max(counting.decoded_ids) <= 10  # the window, not the sequence
    assert detok.text == tokenizer.decode(ids)
