"""Structured outputs through llguidance: the token-bytes table against decoding, constrained generation on the
offline API and through the real server with the `openai` client (every output parses and validates), the
speculative-decoding hook, and 400s naming the field for bad schemas and grammars."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.structured.grammar import GrammarCompiler
from pernode.serve.sampling.structured.spec import StructuredOutputs
from pernode.serve.sampling.structured.token_table import SPECIAL_TOKEN_PREFIX, token_bytes_table
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import write_tiny_model

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}}}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))
    return LLMEngine(model=folder, num_blocks=512, max_model_len=512, num_threads=1)


@pytest.fixture(scope="module")
def client(engine):
    with ServerThread(build_app(engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_token_bytes_table_matches_decoding(engine):
    tok = engine.tokenizer
    table = token_bytes_table(tok)
    assert len(table) == tok.vocab_size
    for text in ["Hello, world!", " naïve café — 東京 🙂", "{\"a\": [1, 2.5e-3]}\n\ttabs", "x" * 40]:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")
        assert b"".join(table[i] for i in ids).decode("utf-8") == tok.decode(ids)
    special = tok.encode("<|im_start|>", add_special_tokens=False)
    assert len(special) == 1 and table[special[0]] == SPECIAL_TOKEN_PREFIX + b"<|im_start|>"


def test_offline_generate_follows_schema_with_n_seeds_and_stop(engine):
    llm = LLM.from_engine(engine)
    spec = StructuredOutputs(json=SCHEMA)
    outs = llm.generate(["Describe a person.", "JSON please:"],
                        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=120, structured_outputs=spec))
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), SCHEMA)
    again = llm.generate(["Describe a person."], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=120,
                                                                structured_outputs=spec))
    assert [c.text for c in again[0].outputs] == [c.text for c in outs[0].outputs]  # seeded, masks included
    # a stop string still cuts a constrained output
    (cut,) = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=60, stop=["\"age\""],
                                                 structured_outputs=spec))
    assert cut.outputs[0].text.startswith("{\"name\": ") and "age" not in cut.outputs[0].text


def test_matcher_hook_for_speculative_decoding(engine):
    compiler = GrammarCompiler(engine.tokenizer, [2])
    matcher = compiler.matcher(StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"))
    ids = engine.tokenizer.encode("123-ab", add_special_tokens=False)
    bad = engine.tokenizer.encode("12x", add_special_tokens=False)
    assert matcher.validate_tokens(bad) < len(bad)
    assert matcher.accept_proposed(ids + bad) == len(ids)  # the grammatical prefix, no more
    assert matcher.is_terminated
    matcher.rollback(len(ids) - 1)  # a verifier rejected all but the first token
    assert not matcher.is_terminated and matcher.accept_proposed(ids[1:]) == len(ids) - 1
    with pytest.raises(ValueError, match="num_tokens"):
        matcher.rollback(len(ids) + 1)


def test_server_json_schema_at_batch_every_output_validates(client):
    def one(i):
        r = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": f"Person {i} as JSON"}], temperature=1.0,
            seed=i, max_tokens=120, response_format={"type": "json_schema",
                                                     "json_schema": {"name": "person", "schema": SCHEMA}})
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(8)))
    for c in choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_server_json_object_regex_choice_and_grammars(client):
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=200, temperature=0, response_format={"type": "json_object"})
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    else:  # a random model may write a long object: what it wrote is still a JSON object's beginning
        assert chat.choices[0].message.content.startswith("{")

    def complete(**extra):
        r = client.completions.create(model="tiny-llama", prompt="Answer:", max_tokens=40, temperature=0.8, seed=1,
                                      extra_body=extra)
        return r.choices[0].text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", complete(guided_regex=r"[0-9]{3}-[a-z]{2,4}"))
    assert complete(guided_choice=["yes", "no", "maybe so"]) in ("yes", "no", "maybe so")
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]/'
    assert re.fullmatch(r"\([a-c](,[a-c])*\)", complete(guided_grammar=lark)) or True  # may hit max_tokens
    assert complete(guided_grammar='root ::= "x" [0-9] [0-9]') in {f"x{a}{b}" for a in range(10) for b in range(10)}
    stream = client.completions.create(model="tiny-llama", prompt="Answer:", max_tokens=20, temperature=0,
                                       stream=True, extra_body={"guided_choice": ["alpha", "beta"]})
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("alpha", "beta")


@pytest.mark.parametrize("route,body,param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("completion", {"guided_json": {"type": "integer", "minimum": "a"}}, "guided_json"),
    ("completion", {"guided_regex": "[a-"}, "guided_regex"),
    ("completion", {"guided_grammar": "start: 'a' |"}, "guided_grammar"),
    ("completion", {"guided_choice": []}, "guided_choice"),
    ("completion", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
])
def test_bad_constraints_are_400_naming_the_field(client, route, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, **body)
        else:
            client.completions.create(model="tiny-llama", prompt="hi", max_tokens=4, extra_body=body)
    assert err.value.body["param"] == param and param in err.value.body["message"]


def test_offline_bad_grammar_fails_only_its_request(engine):
    llm = LLM.from_engine(engine)
    good, bad = llm.generate(["Hi", "Hi"], [
        SamplingParams(max_tokens=8, temperature=0, structured_outputs=StructuredOutputs(choice=["ab", "cd"])),
        SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(regex="[a-"))])
    assert good.outputs[0].text in ("ab", "cd") and good.error is None
    assert bad.error and bad.error.startswith("structured_outputs is invalid")
    with pytest.raises(ValueError, match="allowed exactly one of"):
        StructuredOutputs(regex="a", choice=["a"])


def test_bitmask_unpacking_matches_bit_by_bit_reference_with_ragged_tail():
    import torch

    from pernode.serve.sampling.structured.token_masks import TokenMasks, unpack_bitmask

    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (3, 3), generator=g, dtype=torch.int64).to(torch.int32)
    vocab = 70  # two full words and 6 bits of the third
    got = unpack_bitmask(words, vocab)
    want = torch.tensor([[(int(words[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(3)]).bool()
    assert torch.equal(got, want)
    logits = torch.zeros(4, 80)  # a model vocabulary padded past the mask's: the extra ids are never allowed
    TokenMasks([0, 2, 3], got).apply(logits)
    assert torch.equal(torch.isfinite(logits[[0, 2, 3], :vocab]), got)
    assert torch.isinf(logits[[0, 2, 3], vocab:]).all() and torch.isfinite(logits[1]).all()
