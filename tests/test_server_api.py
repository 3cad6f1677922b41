"""The OpenAI API of `pernode serve` on a real server (uvicorn on a loopback port) over a tiny random model,
driven by the `openai` client and httpx: shapes, streaming, prompt forms, logprobs, metrics, API key, bench."""
import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.cli.bench import add_serve_arguments as add_arguments, bench_config_from_args
from pernode.measure.bench.bench_serve import run_bench
from pernode.serve.server.app import build_app
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.serve import ServerThread
from pernode.serve.server.state import ServerStatus
from tiny_model import write_tiny_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return LLMEngine(model=tiny_folder, num_blocks=256, max_model_len=512, num_threads=1)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(build_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(**kw):
    return dict(model="tiny-llama", temperature=0, extra_body={"ignore_eos": True}, **kw)


def metrics(url: str) -> dict[str, float]:
    """name{label=value,...} -> value, from the Prometheus text format."""
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "tiny-llama" and models["data"][0]["max_model_len"] == 512


def test_completion_sync_and_streaming_agree(client):
    full = client.completions.create(prompt=PROMPT, **greedy(max_tokens=12))
    assert full.object == "text_completion" and full.model == "tiny-llama"
    assert full.choices[0].finish_reason == "length" and full.choices[0].index == 0
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                            **greedy(max_tokens=12)))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_sync_and_streaming(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(messages=messages, **greedy(max_tokens=10))
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(messages=messages, stream=True, **greedy(max_tokens=10)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None

    # The chat template's tokens are what /tokenize counts for the same messages.
    counted = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert counted["count"] == full.usage.prompt_tokens


def test_prompt_forms_n_and_choice_indices(server, client):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(prompt=PROMPT, **greedy(max_tokens=6)).choices[0].text
    by_ids = client.completions.create(prompt=ids, **greedy(max_tokens=6)).choices[0].text
    assert by_ids == by_text

    both = client.completions.create(prompt=[PROMPT, "Once upon a time"], n=2, **greedy(max_tokens=6))
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == by_text  # greedy: every sample agrees
    assert both.usage.completion_tokens == 4 * 6

    lists = client.completions.create(prompt=[ids, ids[:2]], **greedy(max_tokens=3))
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == len(ids) + 2

    sampled = client.completions.create(model="tiny-llama", prompt=PROMPT, n=3, seed=7, temperature=1.0, max_tokens=8,
                                        extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01})
    again = client.completions.create(model="tiny-llama", prompt=PROMPT, n=3, seed=7, temperature=1.0, max_tokens=8,
                                      extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01})
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded


def test_completion_logprobs_and_echo(server):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 3, "echo": True}
    r = httpx.post(server.url + "/v1/completions", json=body).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    n_prompt = r["usage"]["prompt_tokens"]
    assert choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 5
    # Prompt positions carry the prompt's own logprobs; the first token has none (nothing precedes it).
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:n_prompt])
    for token, value, top in zip(lp["tokens"][n_prompt:], lp["token_logprobs"][n_prompt:],
                                 lp["top_logprobs"][n_prompt:]):
        assert value <= 0 and 3 <= len(top) <= 4 and top[token] == value
        assert max(top.values()) == value  # greedy takes the most likely token
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0

    stream_body = {**body, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=stream_body) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]


def test_chat_logprobs(client):
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2,
                                       **greedy(max_tokens=4))
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == item.logprob
        assert isinstance(item.bytes, list) and all(0 <= b < 256 for b in item.bytes)


def test_stop_string_and_min_tokens(client):
    text = client.completions.create(prompt=PROMPT, **greedy(max_tokens=16)).choices[0].text
    stop = text[3:6]
    assert stop.strip()
    r = client.completions.create(prompt=PROMPT, stop=[stop], **greedy(max_tokens=16))
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.index(stop)]
    assert r.model_extra is not None and r.choices[0].model_extra["stop_reason"] == stop


def test_tokenize_detokenize_round_trip(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "héllo wörld 🙂"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back["prompt"] == "héllo wörld 🙂"
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_identical_concurrent_greedy_requests_return_identical_text(client):
    def one(_):
        return client.completions.create(prompt="Once upon a time", **greedy(max_tokens=24)).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(set(texts)) == 1 and texts[0]


def test_metrics_have_vllm_meanings(server, client, engine):
    client.completions.create(prompt=PROMPT, **greedy(max_tokens=4))
    m = metrics(server.url)
    for name in ("pernode:num_requests_running", "pernode:num_requests_waiting", "pernode:kv_cache_usage_perc",
                 "pernode:prefix_cache_queries_total", "pernode:prefix_cache_hits_total",
                 "pernode:num_preemptions_total", "pernode:prompt_tokens_total", "pernode:generation_tokens_total",
                 "pernode:time_to_first_token_seconds_count", "pernode:inter_token_latency_seconds_count",
                 "pernode:e2e_request_latency_seconds_count", "pernode:request_queue_time_seconds_count"):
        assert name in m, name
    assert m["pernode:request_success_total{finished_reason=length}"] >= 1
    assert m["pernode:time_to_first_token_seconds_count"] >= 1 and m["pernode:inter_token_latency_seconds_count"] >= 3
    stats = engine.stats()
    assert m["pernode:generation_tokens_total"] == stats.generation_tokens - 1  # less the start-up warm-up's
    assert m["pernode:prefix_cache_hits_total"] > 0  # the same prompt has been sent many times by now
    assert m["pernode:num_requests_running"] == 0 and m["pernode:kv_cache_usage_perc"] == 0


def test_bench_serve_against_our_server(server):
    args = add_arguments(argparse.ArgumentParser()).parse_args([
        "--base-url", server.url + "/v1", "--num-prompts", "6", "--random-input-len", "12",
        "--random-output-len", "8", "--max-concurrency", "3", "--ignore-eos", "--no-progress"])
    result = run_bench(bench_config_from_args(args)).to_dict()
    assert result["model"] == "tiny-llama"
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["total_output_tokens"] == 6 * 8  # from the usage chunk
    assert not result["notes"]


def test_api_key_guards_v1_only(tiny_folder):
    engine = LLMEngine(model=tiny_folder, num_blocks=64, max_model_len=512, num_threads=1)
    with ServerThread(build_app(engine, ServerSettings(api_key="s3cret"))) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # public
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(prompt=PROMPT, **greedy(max_tokens=2)).usage.completion_tokens == 2


def test_serve_flags_and_api_key_from_env(monkeypatch):
    from pernode.cli import build_parser, command_flags, with_flags
    from pernode.cli.serve import settings_from_args

    monkeypatch.setenv("PERNODE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--max-n", "3", "--max-body-bytes", "2MiB", "--port", "9000"])
    settings = settings_from_args(args)
    assert (settings.api_key, settings.max_n, settings.max_body_bytes, args.port) == ("from-env", 3, 2 * 2**20, 9000)
    assert settings_from_args(build_parser().parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    with pytest.raises(ValueError, match=r"max_logprobs=50 is out of range: allowed 0\.\.20") as exc:
        settings_from_args(build_parser().parse_args(["serve", "--max-logprobs", "50"]))
    flags = command_flags("serve")  # the library names settings; the command line shows the flags
    assert with_flags(str(exc.value), flags).startswith("--max-logprobs 50 is out of range")
    with pytest.raises(ValueError, match=r"shutdown_timeout_s=-1.0") as exc:
        settings_from_args(build_parser().parse_args(["serve", "--shutdown-timeout", "-1"]))
    assert with_flags(str(exc.value), flags).startswith("--shutdown-timeout -1.0 is out of range")


def test_server_settings_round_trip_and_status_compares_as_strings():
    settings = ServerSettings(served_model_name="m", api_key="k", max_n=2, shutdown_timeout_s=5.0)
    assert ServerSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown server settings"):
        ServerSettings.from_dict({"max_n": 2, "max_choices": 3})
    with pytest.raises(ValueError, match=r"^max_n=0 is out of range: allowed >= 1"):
        ServerSettings(max_n=0)
    assert ServerStatus.READY == "ready" and f"{ServerStatus.DRAINING}" == "draining"
