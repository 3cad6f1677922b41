"""Property-based fuzzing of the request path (Hypothesis), short enough for `make test`:

- arbitrary JSON (and non-JSON) bodies to the real server on a loopback port get 200 or a 4xx in OpenAI's error
  shape, never a 500, and the server stays healthy with every KV block back;
- SamplingParams built from any keyword values either constructs or raises ValueError naming a field it was given;
- random sequences of add / step / abort on a tiny engine with a small KV cache (preemption, chunked prefill,
  n > 1, prefix sharing): every block is freed exactly once, no request is lost, and greedy outputs equal
  recomputation without prefix caching, token for token.
"""
from __future__ import annotations

import dataclasses
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.engine.outputs import FinishReason
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import write_tiny_model

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-fuzz"))


# ---- JSON bodies to the real server -------------------------------------------------------------------------

ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k",
          "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
          "ignore_eos", "min_tokens", "logprobs", "top_logprobs", "echo", "stream", "stream_options", "suffix",
          "logit_bias", "best_of", "tokens", "add_special_tokens", "add_generation_prompt", "response_format",
          "tools", "tool_choice", "skip_special_tokens", "user", "guided_json", "guided_regex", "guided_choice",
          "guided_grammar", "allowed_token_ids", "prompt_logprobs"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 1e-300, 2.0, 1e308])
           | st.text(max_size=12) | st.sampled_from(["Hi", "tiny-fuzz", "user", "text", "\ud7ff\u0000", "###"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "include_usage"])
                                             | st.text(max_size=6), inner, max_size=3), max_leaves=8)
plausible = {  # values near the valid ones, so many bodies get past parsing into the engine
    "prompt": st.sampled_from(["Hi", "The capital of France is", ["Hi", "Yo"], [1, 2, 3], [[5, 6], [7]], "", [],
                               [49151], [49152], [-1], [[]]]),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                                "content": st.sampled_from(["Hi", "", None, [{"type": "text",
                                                                                              "text": "Hi"}]])}),
                         max_size=3),
    "max_tokens": st.integers(-1, 12) | st.just(2**63), "n": st.integers(-1, 10),
    "logprobs": st.integers(-1, 22) | st.booleans(), "top_logprobs": st.integers(-1, 22),
    "stream": st.booleans(), "tokens": st.lists(st.integers(-2, 50000), max_size=4),
    "stop": st.sampled_from(["a", ["", "b"], ["x"] * 20, None]),
    "stop_token_ids": st.lists(st.integers(-1, 2**40), max_size=3),
    "guided_regex": st.sampled_from(["[a-z]{2}", "[a-", "(", "a*", ""]),
    "guided_choice": st.sampled_from([["yes", "no"], [], [""], ["x"] * 3]),
    "guided_json": st.sampled_from([{"type": "integer"}, {"type": "nope"}, "{", {"enum": []}, {}]),
    "guided_grammar": st.sampled_from(['start: "a"', "start: 'a' |", 'root ::= "x"', "root ::= ", "%%%"]),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "json_schema"}, {"type": "x"},
                                        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}]),
    "tools": st.sampled_from([[{"type": "function", "function": {"name": "f"}}], [{}], [{"function": 3}]]),
    "tool_choice": st.sampled_from(["auto", "required", "none", {"type": "function", "function": {"name": "f"}}]),
    "logit_bias": st.sampled_from([{"5": 100}, {"x": 1}, {"49152": 1}, {"5": 1e9}]),
    "allowed_token_ids": st.lists(st.integers(-1, 50000), max_size=3),
}
body_values = st.sampled_from(FIELDS).flatmap(lambda k: st.tuples(st.just(k), plausible.get(k, json_values)
                                                                  | json_values))
BASES = {  # a valid body per endpoint, which the fuzz mutates: most mutations are still parsed and run
    "/v1/completions": {"prompt": "Hi", "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
}


def _dump(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals too: JSON that Python writes


@st.composite
def requests(draw):
    endpoint = draw(st.sampled_from(ENDPOINTS))
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "random", "junk"]))
    if kind == "junk":  # not JSON, truncated JSON, or JSON that is not an object
        return endpoint, draw(st.binary(max_size=40) | json_values.map(_dump)
                              | st.just(_dump(BASES[endpoint])[:-1]))
    body = dict(BASES[endpoint]) if kind == "mutated" else {}
    if body and draw(st.integers(0, 5)) == 0:
        del body[draw(st.sampled_from(sorted(body)))]
    body.update(draw(st.lists(body_values, max_size=3 if kind == "mutated" else 8)))
    return endpoint, _dump(body)


@pytest.fixture(scope="module")
def server_engine(tiny_dir):
    return LLMEngine(model=tiny_dir, num_blocks=64, max_model_len=128, num_threads=1)


@pytest.fixture(scope="module")
def server(server_engine):
    with ServerThread(build_app(server_engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _is_openai_error(body: dict) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"] and "type" in err


_status_counts: dict[tuple[str, int], int] = {}


@settings(FUZZ, max_examples=400)
@given(request=requests())
def test_any_body_gets_200_or_an_openai_4xx(http, request):
    endpoint, raw = request
    r = http.post(endpoint, content=raw, headers={"Content-Type": "application/json"})
    _status_counts[endpoint, r.status_code] = _status_counts.get((endpoint, r.status_code), 0) + 1
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert _is_openai_error(r.json()), r.text[:300]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    else:
        r.json()


def test_server_healthy_and_idle_after_fuzzing(http, server_engine):
    assert http.get("/health").status_code == 200
    stats = server_engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks
    if _status_counts:  # the fuzz reached the engine, not only the parser
        print(sorted(_status_counts.items()))
        assert _status_counts.get(("/v1/completions", 200)) and _status_counts.get(("/v1/chat/completions", 200))


# ---- SamplingParams from any keyword values -------------------------------------------------------------------

PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
param_values = (st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.integers(-3, 30)
                | st.floats(allow_nan=True, allow_infinity=True) | st.floats(-3, 3) | st.text(max_size=4)
                | st.lists(st.integers(-2, 5) | st.text(max_size=3) | st.none(), max_size=3) | st.just({"a": 1}))


@settings(FUZZ, max_examples=400)
@given(kwargs=st.dictionaries(st.sampled_from(PARAM_FIELDS), param_values, max_size=6))
def test_sampling_params_construct_or_name_the_field(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except ValueError as exc:
        named = str(exc).split("=", 1)[0]
        assert named in kwargs, f"{exc} does not start with one of the given fields {sorted(kwargs)}"
        return
    params.validate()  # what constructed stays valid
    assert params.temperature >= 0 and math.isfinite(params.temperature)


# ---- add / step / abort on a tiny engine -----------------------------------------------------------------------

BLOCK = 16
PREFIXES = [[(37 * i + 11 * j) % 49000 + 100 for i in range(40)] for j in range(3)]  # 2.5 blocks each, shared
MAX_STEPS_TO_DRAIN = 2000

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(PREFIXES) - 1), st.integers(0, 40),
              st.lists(st.integers(100, 49000), max_size=12), st.integers(1, 10), st.integers(1, 3)),
    st.tuples(st.just("step"), st.integers(1, 6)),
    st.tuples(st.just("abort"), st.integers(0, 50))), min_size=1, max_size=25)


@pytest.fixture(scope="module")
def small_engine(tiny_dir):
    """A cache of 10 blocks (160 tokens) and a 48-token step budget: preemption and chunked prefill are common."""
    return LLMEngine(model=tiny_dir, num_blocks=10, block_size=BLOCK, max_model_len=160,
                     max_num_batched_tokens=48, num_threads=1)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Each prompt alone, no prefix caching: what every greedy output must equal."""
    engine = LLMEngine(model=tiny_dir, num_blocks=64, block_size=BLOCK, max_model_len=160,
                       enable_prefix_caching=False, num_threads=1)
    memo: dict[tuple, list[int]] = {}

    def run(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
        if (prompt, max_tokens) not in memo:
            engine.add_request("ref", list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        memo[prompt, max_tokens] = out.outputs[0].token_ids
        return memo[prompt, max_tokens]
    return run


_totals = {"hits": 0, "preemptions": 0, "aborts": 0}


@settings(FUZZ, max_examples=120)
@given(script=ops)
def test_add_step_abort_keeps_blocks_requests_and_outputs(small_engine, reference, script):
    engine = small_engine
    hits_before, preempt_before = engine.kv.stats.hits_tokens, engine.scheduler.num_preemptions
    added: dict[str, tuple[tuple[int, ...], int, int]] = {}
    finished: dict[str, object] = {}

    def collect(outputs) -> None:
        for out in outputs:
            assert out.request_id in added and out.request_id not in finished, out.request_id
            if out.finished:
                finished[out.request_id] = out

    for k, op in enumerate(script):
        if op[0] == "add":
            _, which, cut, suffix, max_tokens, n = op
            prompt = tuple(PREFIXES[which][:cut] + suffix) or (7,)
            rid = f"r{k}"
            engine.add_request(rid, list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens, n=n,
                                                                 ignore_eos=True))
            added[rid] = (prompt, max_tokens, n)
        elif op[0] == "step":
            for _ in range(op[1]):
                collect(engine.step())
        else:
            live = [r for r in added if r not in finished]
            if live:
                engine.abort_request(live[op[1] % len(live)])
                _totals["aborts"] += 1
    for _ in range(MAX_STEPS_TO_DRAIN):
        if not engine.has_unfinished_requests():
            break
        collect(engine.step())
    assert not engine.has_unfinished_requests(), "requests hung"

    assert set(finished) == set(added), f"lost: {set(added) - set(finished)}"
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert all(b.ref_count == 0 for b in engine.kv.pool.blocks)  # freed exactly once: never negative (asserted
    assert stats.num_free_blocks == stats.num_blocks              # by the pool), never left held
    engine.kv.check_no_leak()

    for rid, out in finished.items():
        prompt, max_tokens, n = added[rid]
        expected = reference(prompt, max_tokens)
        assert len(out.outputs) == n
        for sample in out.outputs:
            assert sample.finish_reason in (FinishReason.LENGTH, FinishReason.ABORT), sample.finish_reason
            if sample.finish_reason is FinishReason.LENGTH:
                assert sample.token_ids == expected, (rid, prompt)
            else:  # aborted part-way: what it produced so far is still right
                assert sample.token_ids == expected[:len(sample.token_ids)], (rid, prompt)
    _totals["hits"] += engine.kv.stats.hits_tokens - hits_before
    _totals["preemptions"] += engine.scheduler.num_preemptions - preempt_before


def test_the_engine_fuzz_reached_prefix_hits_preemption_and_aborts():
    if not any(_totals.values()):
        pytest.skip("the engine fuzz did not run")
    assert _totals["hits"] > 0 and _totals["preemptions"] > 0 and _totals["aborts"] > 0, _totals
