"""`pernode serve` as users run it: the real default model answering a chat through the `openai` client, and the
CLI process draining on SIGTERM (finish what fits in --shutdown-timeout, abort the rest, exit 0)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import tiny_config, write_tiny_model

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.mark.slow
def test_real_model_chat_answers_sync_and_streaming(default_gguf_path):
    engine = LLMEngine(EngineConfig(model="smollm2-135m", num_blocks=128, max_model_len=1024, num_threads=2))
    with ServerThread(build_app(engine)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        full = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=24)
        answer = full.choices[0].message.content
        assert "Paris" in answer, answer
        assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens <= 24

        stream = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0,
                                                max_tokens=24, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        engine.kv.check_no_leak()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


class _Stream(threading.Thread):
    """One streaming completion read in the background: its events, its finish_reason, whether [DONE] came."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.first_event = threading.Event()
        self.text, self.finish_reason, self.done, self.error = "", None, False, None

    def run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        self.text += choice["text"]
                        self.finish_reason = choice["finish_reason"] or self.finish_reason
                        self.first_event.set()
        except Exception as exc:  # noqa: BLE001 - reported by the test's asserts
            self.error = exc
        finally:
            self.first_event.set()


def test_sigterm_drains_then_exits_0(tmp_path):
    folder = write_tiny_model(str(tmp_path / "tiny-llama"), tiny_config(max_position_embeddings=4096))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pernode.cli", "serve", "--model", folder, "--port", str(port), "--num-blocks", "600",
         "--max-model-len", "4096", "--num-threads", "1", "--shutdown-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.1)

        long, short = _Stream(url, 4000), _Stream(url, 100)  # ~5 s or more, vs well under the 2 s drain
        for s in (long, short):
            s.start()
            assert s.first_event.wait(30) and s.error is None
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 5
        while httpx.get(url + "/health").status_code != 503:  # stops admitting at once
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]

        for s in (long, short):
            s.join(30)
        assert short.error is None and short.done and short.finish_reason == "length"  # finished in the drain
        assert long.error is None and long.done and long.finish_reason == "abort"  # cut at --shutdown-timeout
        assert proc.wait(30) == 0
        output = proc.stdout.read()
        assert "KV cache 600 blocks" in output and "max concurrent sequences" in output and "float32" in output
        assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
