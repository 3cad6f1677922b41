"""`logit_bias` (OpenAI: token id -> bias in [-100, 100]) and `allowed_token_ids` (vLLM) through the real server
with the `openai` client, on both routes, and their 400s naming the field."""
import openai
import pytest

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import write_tiny_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))
    return LLMEngine(model=folder, num_blocks=128, max_model_len=256, num_threads=1)


@pytest.fixture(scope="module")
def client(engine):
    with ServerThread(build_app(engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_ids(client, **kw) -> list[int]:
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                  **kw, extra_body={"ignore_eos": True, **kw.pop("extra_body", {})})
    return r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs


def test_bias_plus_100_forces_and_minus_100_bans(client, engine):
    tok = engine.tokenizer
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    base_ids = tok.encode(base.choices[0].text, add_special_tokens=False)
    forced = tok.encode(" Paris", add_special_tokens=False)[0]
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0.7, seed=1,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert tok.encode(r.choices[0].text, add_special_tokens=False) == [forced] * 4
    banned = base_ids[0]
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0,
                                  logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    assert banned not in tok.encode(r.choices[0].text, add_special_tokens=False)
    assert r.choices[0].text != base.choices[0].text
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logit_bias={str(forced): 100},
                                          logprobs=True)
    assert [t.token for t in chat.choices[0].logprobs.content] == [" Paris"] * 3
    # logprobs stay those of the model's own distribution (not of the biased one)
    assert chat.choices[0].logprobs.content[0].logprob < -1


def test_allowed_token_ids_on_both_routes(client, engine):
    tok = engine.tokenizer
    allowed = [tok.encode(w, add_special_tokens=False)[0] for w in (" red", " green", " blue")]
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
    assert set(tok.encode(r.choices[0].text, add_special_tokens=False)) <= set(allowed)
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=1.0, seed=3,
                                          extra_body={"ignore_eos": True, "allowed_token_ids": allowed[:1]})
    assert chat.choices[0].message.content == " red" * 5


@pytest.mark.parametrize("body,contains", [
    ({"logit_bias": {"50": 101}}, "[-100, 100]"),
    ({"logit_bias": {"50": -100.5}}, "[-100, 100]"),
    ({"logit_bias": {"abc": 1}}, "token ids"),
    ({"logit_bias": {"-3": 1}}, "token ids"),
    ({"logit_bias": {"49152": 1}}, "[0, 49152)"),
    ({"allowed_token_ids": [1, 99999]}, "[0, 49152)"),
    ({"allowed_token_ids": []}, "non-empty"),
])
def test_bad_bias_or_allowed_ids_are_400_naming_the_field(client, body, contains):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, extra_body=body)
    assert err.value.body["param"] == next(iter(body)) and contains in err.value.body["message"]


def test_library_level_errors_name_the_field():
    with pytest.raises(ValueError, match=r"logit_bias\[7\]=300"):
        SamplingParams(logit_bias={7: 300})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[-1])
