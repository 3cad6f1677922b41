"""Bench datasets: random prompts hit their token targets, JSONL errors name the line, the chat mix is seeded."""
import json

import pytest

from pernode.measure.bench.datasets import ONE_TOKEN_WORDS, chat_requests, jsonl_requests, random_requests, word_prompt


def test_random_lengths_in_range_and_seeded():
    reqs = random_requests(50, (20, 40), (5, 9), seed=1)
    assert all(20 <= r.prompt_len <= 40 and 5 <= r.max_tokens <= 9 for r in reqs)
    assert all(len(r.prompt.split()) == r.prompt_len and r.endpoint == "completions" for r in reqs)
    assert len({r.prompt for r in reqs}) == 50  # distinct prompts: no accidental prefix-cache hits
    assert [r.prompt for r in random_requests(5, (8, 8), (1, 1), seed=2)] == \
           [r.prompt for r in random_requests(5, (8, 8), (1, 1), seed=2)]


def test_word_prompt_corrects_with_a_tokenizer():
    import numpy as np

    # A toy tokenizer that splits long words in two: the correction loop must still land on the target.
    def tokenize(text):
        return [t for w in text.split() for t in ([w[:3], w[3:]] if len(w) > 5 else [w])]

    text, n = word_prompt(np.random.default_rng(0), 100, tokenize)
    assert n == len(tokenize(text)) and abs(n - 100) <= 1
    assert all(w in ONE_TOKEN_WORDS for w in text.split())


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi there", "max_tokens": 3}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    reqs = jsonl_requests(path, 5, default_max_tokens=11)
    assert [r.endpoint for r in reqs] == ["completions", "chat", "completions", "chat", "completions"]
    assert reqs[0].max_tokens == 3 and reqs[1].max_tokens == 11
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", "max_tokens": 0}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl line 2: max_tokens = 0"):
        jsonl_requests(path, 2)
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 1: needs a string 'prompt'"):
        jsonl_requests(path, 1)


def test_chat_mix():
    reqs = chat_requests(30, seed=4)
    assert all(r.endpoint == "chat" and r.messages[0]["role"] == "user" for r in reqs)
    assert len({r.messages[0]["content"] for r in reqs}) > 5
    assert [r.max_tokens for r in reqs] == [r.max_tokens for r in chat_requests(30, seed=4)]


@pytest.mark.slow
def test_words_are_single_tokens_in_the_default_model(default_model_source):
    # The claim behind tokenizer-free random prompts, checked on SmolLM2's real vocabulary.
    import numpy as np

    tok = default_model_source.tokenizer
    assert [w for w in ONE_TOKEN_WORDS if len(tok.encode(" " + w, add_special_tokens=False)) != 1] == []
    text, n = word_prompt(np.random.default_rng(0), 300)
    assert len(tok.encode(text, add_special_tokens=False)) == n == 300
