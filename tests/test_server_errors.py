"""Bad input and faults on a real `pernode serve` (tiny model): every invalid request gets an OpenAI-shaped error
naming the field; queue limits answer 429; disconnects free their KV blocks; engine failures fail only their own
requests, and a dead engine loop turns /health to 503."""
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.serve import ServerThread
from server_helpers import slow_steps
from tiny_model import write_tiny_model

MAX_MODEL_LEN = 128
SETTINGS = ServerSettings(max_n=4, max_logprobs=5, max_stop=2, max_body_bytes=8192)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def make_engine(folder, **kw):
    return LLMEngine(model=folder, **{"num_blocks": 64, "max_model_len": MAX_MODEL_LEN, "num_threads": 1, **kw})


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return make_engine(tiny_folder)


@pytest.fixture(scope="module")
def url(engine):
    with ServerThread(build_app(engine, SETTINGS)) as srv:
        yield srv.url




def metrics(url: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(url: str, engine, timeout_s: float = 20.0) -> dict[str, float]:
    """Until the engine holds nothing: running = waiting = 0 and no KV block in use; then no block leaked."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        idle = (m["pernode:num_requests_running"], m["pernode:num_requests_waiting"],
                m["pernode:kv_cache_usage_perc"]) == (0, 0, 0)
        if idle:
            engine.kv.check_no_leak()
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        time.sleep(0.05)


def assert_openai_error(r: httpx.Response, status: int, param=None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return err


# (body, param, words the message must contain)
COMPLETION_CASES = [
    ('{"prompt": "hi", ', None, "not valid JSON"),
    ("[1, 2]", None, "must be a JSON object"),
    ('"just a string"', None, "must be a JSON object"),
    ("{}", "prompt", "prompt is required"),
    ({"prompt": 5}, "prompt", "expected a string, a list of strings"),
    ({"prompt": [1, "a"]}, "prompt", "wrong type"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": ["ok", ""]}, "prompt", "prompt[1] is empty"),
    ({"prompt": [1, 49152]}, "prompt", "49152 is out of range"),
    ({"prompt": [-1]}, "prompt", "-1 is out of range"),
    ({"prompt": list(range(1, 200))}, "prompt", "max_model_len"),
    ({"prompt": [1, 2, 3], "max_tokens": 126}, "max_tokens", "exceeds max_model_len"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature", ">= 0"),
    ('{"prompt": "hi", "temperature": NaN}', "temperature", "temperature=nan"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"prompt": "hi", "top_k": -2}, "top_k", "top_k=-2"),
    ({"prompt": "hi", "min_p": 2}, "min_p", "[0, 1]"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"prompt": "hi", "frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", "(0, 10]"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "hi", "min_tokens": -1}, "min_tokens", ">= 0"),
    ({"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens", "<= max_tokens"),
    ({"prompt": "hi", "seed": -1}, "seed", "seed=-1"),
    ({"prompt": "hi", "n": 0}, "n", "1..4"),
    ({"prompt": "hi", "n": 5}, "n", "server setting max_n"),
    ({"prompt": "hi", "n": True}, "n", "valid integer"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs", "0..5"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs", "server setting max_logprobs"),
    ({"prompt": "hi", "stop": ["a", "b", "c"]}, "stop", "server setting max_stop"),
    ({"prompt": "hi", "stop": 5}, "stop", "a string or a list of strings"),
    ({"prompt": "hi", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "hi", "echo": "yes"}, "echo", "valid boolean"),
    ({"prompt": "hi", "stream_options": 3}, "stream_options", "invalid"),
    ({"prompt": "hi", "logit_bias": "x"}, "logit_bias", "invalid"),
    ({"prompt": "hi", "logit_bias": {"50": 101}}, "logit_bias", "[-100, 100]"),
    ({"prompt": "hi", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "hi", "user": 12}, "user", "valid string"),
]

CHAT_CASES = [
    ({}, "messages", "messages is required"),
    ({"messages": []}, "messages", "empty"),
    ({"messages": "hi"}, "messages", "invalid"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "allowed system"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "only text parts"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 6}, "top_logprobs",
     "server setting max_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_tokens", ">= 1"),
    ({"messages": [{"role": "user", "content": "hi " * 200}]}, "messages", "max_model_len"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools", "invalid"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "response_format", "invalid"),
]


def _post(url: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("body,param,contains", COMPLETION_CASES)
def test_bad_completion_requests_get_400_naming_the_field(url, body, param, contains):
    assert_openai_error(_post(url, "/v1/completions", body), 400, param, contains)


@pytest.mark.parametrize("body,param,contains", CHAT_CASES)
def test_bad_chat_requests_get_400_naming_the_field(url, body, param, contains):
    assert_openai_error(_post(url, "/v1/chat/completions", body), 400, param, contains)


def test_bad_streaming_request_fails_before_the_stream(url):
    r = _post(url, "/v1/completions", {"prompt": "hi", "stream": True, "temperature": -1})
    assert_openai_error(r, 400, "temperature", "temperature=-1")


def test_unknown_model_and_route_get_404(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    assert_openai_error(httpx.post(url + "/v1/nothing", json={}), 404, None, "no route POST /v1/nothing")
    assert_openai_error(httpx.get(url + "/nope"), 404, None, "no route")
    assert_openai_error(httpx.get(url + "/v1/completions"), 405, None, "not allowed")


def test_body_above_max_body_bytes_gets_413(url):
    big = {"prompt": "x" * 10_000}
    assert_openai_error(httpx.post(url + "/v1/completions", json=big), 413, None, "max_body_bytes=")

    def chunked():  # no Content-Length: the server counts as it reads
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, None, "larger than 8192 bytes")
    assert httpx.get(url + "/health").status_code == 200


def test_queue_at_max_queued_requests_gets_429_with_retry_after(tiny_folder, monkeypatch):
    engine = make_engine(tiny_folder, max_num_seqs=1)
    slow_steps(monkeypatch, engine)
    body = {"prompt": "hi", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with ServerThread(build_app(engine, ServerSettings(max_queued_requests=1))) as srv, httpx.Client() as a, \
            httpx.Client() as b:
        with a.stream("POST", srv.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the response
            next(lines)  # running: the one sequence the engine batches
            with b.stream("POST", srv.url + "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200  # queued behind it
                r = httpx.post(srv.url + "/v1/completions", json=body)
                err = assert_openai_error(r, 429, None, "max_queued_requests=1")
                assert err["type"] == "rate_limit_error" and r.headers["Retry-After"] == "1"
        # Both clients hung up mid-stream: their requests are aborted and every block comes back.
        m = wait_idle(srv.url, engine)
        assert m["pernode:request_success_total{finished_reason=abort}"] == 2


def test_disconnects_abort_and_free_blocks(url, engine, monkeypatch):
    slow_steps(monkeypatch, engine)
    before = metrics(url)["pernode:request_success_total{finished_reason=abort}"]
    body = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True}
    with httpx.Client(limits=httpx.Limits(max_connections=32)) as client:
        streams = [client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) for _ in range(12)]
        lines = [s.__enter__().iter_lines() for s in streams]
        for it in lines:
            next(it)  # the first event: it is running
        assert metrics(url)["pernode:num_requests_running"] == 12
        for s in streams:
            s.__exit__(None, None, None)  # hang up mid-stream
    for _ in range(4):  # non-streaming clients that give up waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.5))
    m = wait_idle(url, engine)
    assert m["pernode:request_success_total{finished_reason=abort}"] - before == 16


def test_failing_step_fails_its_requests_and_server_goes_on(url, engine, monkeypatch):
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    err = assert_openai_error(r, 500, None, "RuntimeError: boom")
    assert err["type"] == "server_error"
    with httpx.stream("POST", url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "boom" in json.loads(events[-2])["error"]["message"]
    monkeypatch.setattr(engine.runner, "execute", real)
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    m = wait_idle(url, engine)
    assert m["pernode:request_success_total{finished_reason=error}"] >= 2
    assert httpx.get(url + "/health").status_code == 200


def test_dead_engine_loop_turns_health_503(tiny_folder, monkeypatch):
    engine = make_engine(tiny_folder)
    with ServerThread(build_app(engine)) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(MemoryError("scheduler broke")))
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert_openai_error(r, 500, None, "scheduler broke")
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "dead"}
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert_openai_error(r, 503, None, "engine stopped")


def test_health_is_503_while_loading_and_when_loading_failed(tiny_folder, monkeypatch):
    import pernode.serve.server.app as app_module
    from pernode.config import EngineConfig

    gate = threading.Event()

    class GatedEngine(LLMEngine):  # loading takes as long as the test wants
        def __init__(self, *args, **kwargs):
            gate.wait(30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(app_module, "LLMEngine", GatedEngine)
    config = EngineConfig(model=tiny_folder, num_blocks=64, max_model_len=MAX_MODEL_LEN, num_threads=1)
    with ServerThread(build_app(config)) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert_openai_error(r, 503, None, "still loading")
        assert r.headers["Retry-After"] == "1"
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200

    with ServerThread(build_app(EngineConfig(model=str(tiny_folder) + "-missing"))) as srv:
        deadline = time.monotonic() + 30
        while (health := httpx.get(srv.url + "/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"})
        assert_openai_error(r, 503, None, "failed to load")
