"""The server's limits, backpressure and exposure (issue 14), on a real server over a tiny random model: per-request
sequence caps, a queue counted in sequences, stop-list caps, an in-flight cap checked before the body is read, a
body-read timeout, Content-Type / Origin / Host checks, API keys from a file and behind a root path, and settings
that are refused at start."""
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from fastapi import FastAPI

from pernode.cli import build_parser, command_flags, main, with_flags
from pernode.cli.serve import settings_from_args
from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.serve import ServerThread
from server_helpers import slow_steps
from tiny_model import write_tiny_model

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return LLMEngine(model=tiny_folder, num_blocks=64, max_model_len=128, num_threads=1)


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(max_seqs_per_request=16, max_stop_token_ids=4, max_stop_len=8)
    with ServerThread(build_app(engine, settings)) as srv:
        yield srv


def error_of(r: httpx.Response, status: int, param=None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err["message"]
    return err




def waiting(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("pernode:num_requests_waiting"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no pernode:num_requests_waiting")


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A connection that sends a request's head and part of its body, and keeps the rest back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


# ---- 1. sequences per request, and a queue counted in sequences ---------------------------------------------
def test_prompts_times_n_over_max_seqs_per_request_gets_400_at_once(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["a"] * 300, "n": 2, "max_tokens": 1}, timeout=30)
    error_of(r, 400, "prompt", "300 prompts x n=2 = 600 sequences")
    assert "max_seqs_per_request=16" in r.json()["error"]["message"]
    assert waiting(server.url) == 0


def test_queue_limit_counts_sequences_and_admits_a_request_whole_or_not_at_all(tiny_folder, monkeypatch):
    engine = LLMEngine(model=tiny_folder, num_blocks=64, max_model_len=128, num_threads=1, max_num_seqs=1)
    slow_steps(monkeypatch, engine)
    body = {"prompt": "hi", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with ServerThread(build_app(engine, ServerSettings(max_queued_requests=4))) as srv, httpx.Client() as a, \
            httpx.Client() as b:
        with a.stream("POST", srv.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()
            next(lines)
            with b.stream("POST", srv.url + "/v1/completions", json=body) as queued:
                assert queued.status_code == 200
                # 1 waiting + 2 prompts x n=2 = 5 > 4: refused whole, nothing of it added
                r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": ["hi", "ho"], "n": 2})
                err = error_of(r, 429, None, "max_queued_requests=4")
                assert "4 more" in err["message"] and r.headers["Retry-After"] == "1"
                assert waiting(srv.url) == 1
                # a request that could never fit the queue is a 400, not a retry-later
                r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": ["a", "b", "c"], "n": 2})
                error_of(r, 400, "prompt", "max_queued_requests=4")


# ---- 2. stop lists --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,param,contains", [
    ({"stop_token_ids": [5] * 5}, "stop_token_ids", "max_stop_token_ids=4"),
    ({"stop": ["x" * 9]}, "stop", "max_stop_len=8"),
    ({"stop": "y" * 20}, "stop", "max_stop_len=8"),
])
def test_stop_lists_are_capped(server, extra, param, contains):
    error_of(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", **extra}), 400, param, contains)
    ok = httpx.post(server.url + "/v1/completions",
                    json={"prompt": "hi", "max_tokens": 2, "stop_token_ids": [5] * 4, "stop": ["x" * 8]})
    assert ok.status_code == 200, ok.text


# ---- 3. in-flight cap before the body, body-read timeout, /tokenize behind the same limits ---------------------
def test_in_flight_cap_answers_before_reading_the_body_and_covers_tokenize(engine):
    settings = ServerSettings(max_concurrent_requests=1, body_read_timeout_s=5)
    with ServerThread(build_app(engine, settings)) as srv:
        head = (f"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 100\r\n")
        slow = raw_request(srv.port, head, b'{"prompt": "h')  # holds the one slot while it "uploads"
        try:
            time.sleep(0.2)
            for path in ("/tokenize", "/detokenize", "/v1/completions"):
                r = httpx.post(srv.url + path, json={"prompt": "hi"}, timeout=10)
                err = error_of(r, 429, None, "max_concurrent_requests=1")
                assert err["code"] == "too_many_requests" and r.headers["Retry-After"] == "1"
            assert httpx.get(srv.url + "/health").status_code == 200  # health is never refused
        finally:
            slow.close()
        deadline = time.monotonic() + 5
        while httpx.post(srv.url + "/tokenize", json={"prompt": "hi"}).status_code != 200:  # the slot comes back
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_body_read_timeout_gets_408(engine):
    with ServerThread(build_app(engine, ServerSettings(body_read_timeout_s=0.5))) as srv:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 100\r\n")
        sock = raw_request(srv.port, head, b'{"prompt": ')
        try:
            reply = sock.recv(65536).decode()
            assert reply.startswith("HTTP/1.1 408"), reply
            assert "body_read_timeout_s=0.5" in reply
        finally:
            sock.close()
        assert httpx.get(srv.url + "/health").status_code == 200


def test_a_request_head_that_never_completes_is_closed(engine):
    """Slowloris on the headers: uvicorn alone keeps such a socket open forever; the head has the same deadline."""
    with ServerThread(build_app(engine, ServerSettings(body_read_timeout_s=0.5))) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1")  # the head never ends
        try:
            assert sock.recv(65536) == b""  # closed by the server (our own timeout would raise instead)
        finally:
            sock.close()
        assert httpx.get(srv.url + "/health").status_code == 200


def test_tokenize_and_detokenize_need_the_api_key(engine):
    with ServerThread(build_app(engine, ServerSettings(api_key="s3cret"))) as srv:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
            r = httpx.post(srv.url + path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(srv.url + path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, r.text
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200


# ---- 4. bad engine or server settings: exit 2 at once, naming the flag ------------------------------------------
def test_serve_with_max_num_seqs_0_exits_2_at_once_naming_the_flag(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pernode.cli", "serve", "--model", str(tmp_path / "missing"),
                           "--max-num-seqs", "0", "--port", "1"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert "--max-num-seqs 0 is out of range" in proc.stderr and "missing" not in proc.stderr


@pytest.mark.parametrize("argv,flag", [
    (["--max-num-batched-tokens", "-5"], "--max-num-batched-tokens -5"),
    (["--max-n", "0"], "--max-n 0"),
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests 0"),
    (["--max-seqs-per-request", "0"], "--max-seqs-per-request 0"),
    (["--body-read-timeout", "0"], "--body-read-timeout 0"),
])
def test_bad_engine_or_server_setting_exits_2_naming_the_flag(argv, flag, caplog, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing"), *argv]) == 2
    assert flag in caplog.text and "missing" not in caplog.text


# ---- 5. a KV cache smaller than max_model_len is found at start --------------------------------------------------
def test_unset_max_model_len_is_lowered_to_what_the_cache_holds(tiny_folder, caplog):
    config = EngineConfig(model=tiny_folder, num_blocks=4, block_size=16, num_threads=1)  # 64 tokens < 1024
    with ServerThread(build_app(config)) as srv:
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"] == 64
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text  # no max_tokens: up to the context, which now fits the cache
    assert "max_model_len" in caplog.text and "64" in caplog.text


def test_explicit_max_model_len_the_cache_cannot_hold_fails_at_start(tiny_folder):
    config = EngineConfig(model=tiny_folder, num_blocks=4, block_size=16, max_model_len=512, num_threads=1)
    with ServerThread(build_app(config)) as srv:
        deadline = time.monotonic() + 60
        while (health := httpx.get(srv.url + "/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.json() == {"status": "failed"}
        message = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}).json()["error"]["message"]
        assert "max_model_len=512" in message and "kv_cache_bytes" in message and "64 tokens" in message


# ---- 6. /v1/models shows the served name only ---------------------------------------------------------------------
def test_models_do_not_show_the_model_path(server, tiny_folder):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200 and tiny_folder not in r.text and os.path.dirname(tiny_folder) not in r.text
    assert r.json()["data"][0]["id"] == "tiny-llama"


# ---- 7. Content-Type, Origin and Host (a web page must not drive a loopback server) ---------------------------
def test_post_without_json_content_type_gets_415(server):
    for headers in ({"Content-Type": "text/plain"}, {}):
        r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}', headers=headers)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_cross_site_origin_is_refused_unless_allowed(engine):
    body = {"prompt": "hi", "max_tokens": 1}
    settings = ServerSettings(allowed_origins=("https://app.example",))
    with ServerThread(build_app(engine, settings)) as srv:
        r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Origin": "https://evil.example"})
        err = error_of(r, 403, None, "origin 'https://evil.example'")
        assert err["code"] == "origin_not_allowed" and "allowed_origins" in err["message"]
        same = httpx.post(srv.url + "/v1/completions", json=body, headers={"Origin": srv.url})
        assert same.status_code == 200, same.text
        ok = httpx.post(srv.url + "/v1/completions", json=body, headers={"Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        preflight = httpx.options(srv.url + "/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        assert preflight.status_code == 200


def test_host_is_checked_on_loopback(engine):
    body = {"prompt": "hi", "max_tokens": 1}
    with ServerThread(build_app(engine, ServerSettings(allowed_hosts=("models.internal",)))) as srv:
        for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "models.internal"):
            r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Host": host})
            assert r.status_code == 200, (host, r.text)
        for host in (f"rebound.example:{srv.port}", "localhost:1"):  # DNS rebinding: the page's own host name
            r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Host": host})
            err = error_of(r, 403, None, f"host {host!r}")
            assert err["code"] == "host_not_allowed" and "allowed_hosts" in err["message"]
            assert httpx.get(srv.url + "/v1/models", headers={"Host": host}).status_code == 403


# ---- 8. the API key from a file or the environment ---------------------------------------------------------------
def test_api_key_from_a_file_read_once_and_stripped(tmp_path, monkeypatch):
    monkeypatch.delenv("PERNODE_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret\n")
    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve", "--api-key-file", str(key_file)])).api_key == "s3cret"
    flags = command_flags("serve")
    for path, why in ((tmp_path / "empty", "is empty"), (tmp_path / "nope", "cannot be read")):
        if "empty" in str(path):
            path.write_text(" \n")
        with pytest.raises(ValueError, match=why) as exc:
            settings_from_args(parse(["serve", "--api-key-file", str(path)]))
        assert with_flags(str(exc.value), flags).startswith(f"--api-key-file {str(path)!r}")
    with pytest.raises(ValueError, match="not both"):
        settings_from_args(parse(["serve", "--api-key", "a", "--api-key-file", str(key_file)]))
    monkeypatch.setenv("PERNODE_API_KEY", "from-env")
    assert settings_from_args(parse(["serve"])).api_key == "from-env"


# ---- 9. the API key behind a root path or a mount -------------------------------------------------------------
def test_api_key_is_checked_under_a_mount_prefix(engine):
    inner = build_app(engine, ServerSettings(api_key="s3cret"))
    outer = FastAPI(lifespan=lambda app: inner.router.lifespan_context(inner))
    outer.mount("/api", inner)
    with ServerThread(outer) as srv:
        for path in ("/api/v1/models", "/api/tokenize"):
            r = httpx.request("GET" if "models" in path else "POST", srv.url + path, json={"prompt": "hi"})
            assert r.status_code == 401, (path, r.text)
        assert httpx.get(srv.url + "/api/health").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/api/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny-llama"]


def test_api_key_is_checked_under_root_path(engine):
    # uvicorn --root-path: a proxy strips /api and forwards /v1/models; the app sees path /api/v1/models
    with ServerThread(build_app(engine, ServerSettings(api_key="s3cret")), root_path="/api") as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, r.text
