"""A bounded load test on a real `pernode serve` (tiny model): 200 streaming requests from 32 concurrent clients, a
random 20% of which hang up early. Every other request ends with a finish_reason, and afterwards nothing runs,
nothing waits and every KV block is free."""
import asyncio
import json
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.server.app import build_app
from pernode.serve.server.serve import ServerThread
from tiny_model import write_tiny_model

NUM_REQUESTS, CONCURRENCY, DISCONNECT_FRACTION = 200, 32, 0.2
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old green tree".split()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-llama"))
    # A cache that cannot hold 32 long requests at once: preemption and queueing are part of the run.
    return LLMEngine(model=folder, num_blocks=48, max_model_len=256, num_threads=1)


def gauges(url: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def one_request(client: httpx.AsyncClient, rng: random.Random, i: int) -> dict:
    disconnect_after = rng.randint(1, 3) if rng.random() < DISCONNECT_FRACTION else None
    words = rng.sample(WORDS, rng.randint(3, 12))
    chat = i % 4 == 0
    body = {"max_tokens": rng.randint(4, 40), "temperature": rng.choice([0.0, 0.8]), "seed": i, "stream": True,
            "ignore_eos": rng.random() < 0.5, "stream_options": {"include_usage": True}}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    if chat:
        body["messages"] = [{"role": "user", "content": " ".join(words)}]
    else:
        body["prompt"] = " ".join(words)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    result = {"disconnected": False, "finish_reason": None, "done": False, "usage": None, "status": None}
    async with client.stream("POST", path, json=body) as resp:
        result["status"] = resp.status_code
        events = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result["done"] = True
                break
            event = json.loads(data)
            assert "error" not in event, event
            events += 1
            for choice in event["choices"]:
                if choice.get("finish_reason"):
                    result["finish_reason"] = choice["finish_reason"]
            if event.get("usage"):
                result["usage"] = event["usage"]
            if disconnect_after is not None and events >= disconnect_after:
                result["disconnected"] = True
                break  # leaving the block closes the connection mid-stream
    return result


async def run_load(url: str) -> list[dict]:
    rng = random.Random(1234)
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60.0)) as client:
        async def limited(i: int) -> dict:
            async with sem:
                return await one_request(client, rng, i)

        return await asyncio.gather(*(limited(i) for i in range(NUM_REQUESTS)))


def test_200_streams_32_clients_20_percent_disconnect(engine):
    with ServerThread(build_app(engine)) as srv:
        started = time.monotonic()
        results = asyncio.run(run_load(srv.url))
        elapsed_s = time.monotonic() - started
        assert all(r["status"] == 200 for r in results)
        gone = [r for r in results if r["disconnected"]]
        kept = [r for r in results if not r["disconnected"]]
        assert 20 <= len(gone) <= 60  # ~20% of 200
        for r in kept:
            assert r["done"] and r["finish_reason"] in ("stop", "length"), r
            assert r["usage"]["completion_tokens"] >= 1
        # Disconnects abort at once: nothing left running or waiting, and every block back in the pool.
        deadline = time.monotonic() + 20
        while True:
            m = gauges(srv.url)
            if (m["pernode:num_requests_running"], m["pernode:num_requests_waiting"],
                    m["pernode:kv_cache_usage_perc"]) == (0, 0, 0):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        engine.kv.check_no_leak()
        assert not engine.has_unfinished_requests()
        finished = sum(m[f"pernode:request_success_total{{finished_reason={r}}}"] for r in ("stop", "length"))
        aborted = m["pernode:request_success_total{finished_reason=abort}"]
        # A client may hang up just as its request finishes: then it counts as finished, not aborted.
        assert finished + aborted == NUM_REQUESTS and finished >= len(kept) and aborted <= len(gone)
        assert m["pernode:request_success_total{finished_reason=error}"] == 0
        print(f"{NUM_REQUESTS} requests in {elapsed_s:.1f} s; {len(gone)} disconnected, "
              f"{m['pernode:num_preemptions_total']:.0f} preemptions")
