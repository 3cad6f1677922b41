"""Prompt logprobs: `echo` + `logprobs` on /v1/completions (lm-eval's log-likelihood request) and
`SamplingParams.prompt_logprobs`, held to a direct forward pass of the engine's model, across
chunked prefill and with the prefix cache warm."""
import math

import httpx
import openai
import pytest
import torch

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.kernels.attention_metadata import AttentionMetadata, contiguous_block_tables
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import write_tiny_model

CONTEXT = "The quick brown fox jumps over the lazy dog because it wanted to see what lies beyond the hill,"
CONTINUATION = " And then it ran all the way home, where its friends were waiting for dinner."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="module")
def engine(folder):
    # a 16-token budget splits every prompt here into chunks; 16-token blocks make the prefix cache matter
    return LLMEngine(model=folder, num_blocks=256, max_model_len=512, num_threads=1, block_size=16,
                     max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(build_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(engine):
    """Per-token log-probabilities from one direct forward of the engine's model over the whole sequence, in a KV
    cache of its own in the engine's storage dtype (no scheduler, chunks, block pool or prefix cache); the model
    itself is held to transformers in test_model_vs_hf."""
    model = engine.model
    c = model.config
    kv_dtype = engine.runner.kv_caches[0][0].dtype

    def logprobs(ids: list[int]) -> list[float]:
        n, block = len(ids), 16
        tables = contiguous_block_tables(1, n, block)
        shape = (tables.numel(), block, c.num_key_value_heads, c.head_dim)
        caches = [(torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype))
                  for _ in range(c.num_hidden_layers)]
        meta = AttentionMetadata.build(tables, [0], [n], block)
        with torch.inference_mode():
            logits = model(torch.tensor(ids), torch.arange(n), caches, meta).float()
        lp = torch.log_softmax(logits, dim=-1)
        return [lp[i - 1, ids[i]].item() for i in range(1, n)]

    return logprobs


def test_server_loglikelihood_of_a_continuation_equals_a_direct_forward(server, engine, reference):
    tok = engine.tokenizer
    ctx_ids = tok.encode(CONTEXT)
    full_ids = tok.encode(CONTEXT + CONTINUATION)
    assert full_ids[:len(ctx_ids)] == ctx_ids and len(full_ids) > 32
    expected = reference(full_ids)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for _ in range(2):  # the second time the prompt's blocks are in the prefix cache: none may be skipped
        r = client.completions.create(model="tiny-llama", prompt=CONTEXT + CONTINUATION, max_tokens=0, echo=True,
                                      logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == CONTEXT + CONTINUATION and r.usage.completion_tokens == 0
        assert len(lp.token_logprobs) == len(full_ids) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and "".join(lp.tokens) == CONTEXT + CONTINUATION
        for got, want in zip(lp.token_logprobs[1:], expected):
            assert got == pytest.approx(want, abs=2e-4)
        continuation = sum(lp.token_logprobs[len(ctx_ids):])
        assert continuation == pytest.approx(sum(expected[len(ctx_ids) - 1:]), abs=1e-3)
        for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert top[token] == value and 1 <= len(top) <= 2 and all(v <= 0 for v in top.values())
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # every position recomputed
    plain = client.completions.create(model="tiny-llama", prompt=CONTEXT + CONTINUATION, max_tokens=1)
    assert plain.usage.prompt_tokens_details.cached_tokens >= 32  # the blocks were cached all along


def test_echo_streams_prompt_logprobs_then_generated_ones(server, engine):
    body = {"prompt": CONTEXT, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 2, "echo": True}
    full = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    n_prompt = len(engine.tokenizer.encode(CONTEXT))
    assert len(full["token_logprobs"]) == n_prompt + 3 and full["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in full["token_logprobs"][1:])
    import json
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    values = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert values == full["token_logprobs"]


def test_llm_generate_prompt_logprobs_with_top_n_and_n_samples(engine, reference):
    llm = LLM.from_engine(engine)
    ids = engine.tokenizer.encode(CONTEXT)
    (out,) = llm.generate([ids], SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=2, prompt_logprobs=3))
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for entry, token_id, want in zip(lps[1:], ids[1:], reference(ids)):
        assert entry.token_id == token_id and entry.logprob == pytest.approx(want, abs=2e-4)
        assert len(entry.top) == 3 and entry.top[0][2] >= entry.logprob - 1e-6
        assert [v for _, _, v in entry.top] == sorted((v for _, _, v in entry.top), reverse=True)
    (plain,) = llm.generate([ids], SamplingParams(max_tokens=1))
    assert plain.prompt_logprobs is None
    assert not math.isnan(sum(e.logprob for e in lps[1:]))


def test_prompt_logprobs_out_of_range_is_400(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "prompt_logprobs": 99}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
