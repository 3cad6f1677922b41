"""A model whose vocabulary is padded past its tokenizer's (common: sizes rounded up to a multiple of 64 or 128)
can sample or rank an id the tokenizer cannot decode. Such ids render as an empty token with `bytes` null (what
vLLM sends), in chat and completion logprobs, through the real server and the `openai` client."""
from __future__ import annotations

import openai
import pytest

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import tiny_config, write_tiny_model

TOKENIZER_VOCAB = 49152
# Half of the model's ids have no token: with random weights nearly every top-5 list holds some.
MODEL_VOCAB = 2 * TOKENIZER_VOCAB


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-padded"),
                              tiny_config(vocab_size=MODEL_VOCAB, name="tiny-padded"))
    engine = LLMEngine(model=folder, num_blocks=64, max_model_len=256, num_threads=1)
    assert engine.tokenizer.vocab_size == TOKENIZER_VOCAB and engine.model_config.vocab_size == MODEL_VOCAB
    return engine


@pytest.fixture(scope="module")
def client(engine):
    with ServerThread(build_app(engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _check(token_id_known: bool, token: str, raw_bytes) -> None:
    if token_id_known:
        assert isinstance(raw_bytes, list) and all(0 <= b < 256 for b in raw_bytes)
    else:
        assert token == "" and raw_bytes is None


def test_engine_logprobs_name_padded_ids_with_an_empty_token(engine):
    from pernode.serve.sampling.params import SamplingParams

    engine.add_request("p", "Hello there", SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    lps = final.outputs[0].logprobs
    ids = [t for lp in lps for t, _, _ in lp.top]
    assert any(t >= TOKENIZER_VOCAB for t in ids), "the test needs padded ids among the top logprobs"
    for lp in lps:
        for token_id, token, _ in lp.top:
            assert token_id < TOKENIZER_VOCAB or token == ""


def test_chat_logprobs_render_padded_ids(client):
    r = client.chat.completions.create(model="tiny-padded", messages=[{"role": "user", "content": "Hi"}],
                                       logprobs=True, top_logprobs=5, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    seen_padded = False
    for item in content:
        _check(item.bytes is not None, item.token, item.bytes)
        for alt in item.top_logprobs:
            _check(alt.bytes is not None, alt.token, alt.bytes)
            seen_padded |= alt.bytes is None
    assert seen_padded, "the test needs padded ids among the top logprobs"


def test_streamed_chat_and_completion_logprobs_with_padded_ids(client):
    stream = client.chat.completions.create(model="tiny-padded", messages=[{"role": "user", "content": "Hi"}],
                                            logprobs=True, top_logprobs=5, max_tokens=4, temperature=0.8, seed=3,
                                            stream=True, extra_body={"ignore_eos": True})
    items = [i for chunk in stream if chunk.choices and chunk.choices[0].logprobs
             for i in chunk.choices[0].logprobs.content]
    assert len(items) == 4
    done = client.completions.create(model="tiny-padded", prompt="Hi", logprobs=5, max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert len(done.choices[0].logprobs.tokens) == 4
