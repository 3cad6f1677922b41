"""Soak test of `pernode serve`: one request, or a thousand, must not take the node down.

Starts `pernode serve` on a free loopback port, warms it up, records the server's RSS, then sends `--requests`
Poisson arrivals (short streamed completions and chats) at a rate above capacity. A fraction is aborted by the
client at a random point (before the first byte or mid-stream), and malformed requests (bad JSON, wrong types,
out-of-range values, unknown routes) are interleaved. A probe calls /health every 50 ms throughout. Afterwards:

- lost or hung: 0 (every request not aborted ends in a complete stream, a 429 while the queue is full, or, for
  a malformed one, a 4xx in OpenAI's error shape; nothing times out and nothing gets a 5xx);
- `running`, `waiting` and the KV cache in use are back to 0 (from /metrics);
- the server's RSS within 5% of its baseline after warm-up (sequential requests, then a burst like the soak's:
  memory the allocators keep after peak concurrency is not a leak, growth beyond it is);
- p99 /health latency under 100 ms during the load.

The load average is printed beside the figures (the machine may be shared). Exit status 1 if a check fails.

    .venv/bin/python benchmarks/soak.py --tiny              # a tiny random model: a few minutes on 2 cores
    .venv/bin/python benchmarks/soak.py --model smollm2-135m --rate 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colours:",
           "In 1969, the first", "Water boils at"]
MALFORMED = [  # (path, body): each must get a 4xx in OpenAI's error shape
    ("/v1/completions", b"{not json"),
    ("/v1/completions", json.dumps({"prompt": "Hi", "temperature": -1}).encode()),
    ("/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": "ten"}).encode()),
    ("/v1/completions", json.dumps({"prompt": "Hi", "n": 10_000}).encode()),
    ("/v1/completions", json.dumps({"prompt": [10**12]}).encode()),
    ("/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 10**9}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "Hi"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": "Hi"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}).encode()),
    ("/v1/completions", json.dumps({"prompt": "Hi", "stop": ["x"] * 1000}).encode()),
    ("/v1/nowhere", b"{}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def read_metrics(base: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for s in family.samples:
            if not s.labels.keys() - {"model_name"}:
                out[s.name] = s.value
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


class Soak:
    def __init__(self, base: str, args):
        self.base, self.args = base, args
        self.rng = random.Random(args.seed)
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []
        self.health_ms: list[float] = []

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def one(self, client: httpx.AsyncClient, i: int, abort_after_s: float | None) -> None:
        chat = i % 2 == 1
        body = {"max_tokens": self.rng.randint(1, self.args.max_tokens), "stream": True, "temperature": 0.8,
                "seed": i, "ignore_eos": True}
        prompt = self.rng.choice(PROMPTS)
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        path = "/v1/chat/completions" if chat else "/v1/completions"

        async def run() -> None:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code == 429:
                    await r.aread()
                    self.count("rejected 429 (queue full)")
                    return
                if r.status_code != 200:
                    self.problems.append(f"request {i}: HTTP {r.status_code} {(await r.aread())[:200]!r}")
                    self.count("lost")
                    return
                last = ""
                async for line in r.aiter_lines():
                    if line.strip():
                        last = line.strip()
                if last != "data: [DONE]":
                    self.problems.append(f"request {i}: stream ended with {last[:200]!r}")
                    self.count("lost")
                    return
                self.count("completed")

        try:
            if abort_after_s is None:
                await asyncio.wait_for(run(), timeout=self.args.request_timeout_s)
            else:
                try:
                    await asyncio.wait_for(run(), timeout=abort_after_s)
                    self.count("abort came too late (completed)")
                except asyncio.TimeoutError:
                    self.count("aborted by the client")
        except asyncio.TimeoutError:
            self.problems.append(f"request {i}: no end after {self.args.request_timeout_s} s")
            self.count("hung")
        except httpx.HTTPError as exc:
            self.problems.append(f"request {i}: {type(exc).__name__}: {exc}")
            self.count("lost")

    async def malformed(self, client: httpx.AsyncClient) -> None:
        path, raw = self.rng.choice(MALFORMED)
        try:
            r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
            err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            if 400 <= r.status_code < 500 and isinstance(err, dict) and err.get("message"):
                self.count("malformed -> 4xx")
            else:
                self.problems.append(f"malformed {path} {raw[:60]!r}: HTTP {r.status_code} {r.text[:200]!r}")
                self.count("malformed, wrong answer")
        except httpx.HTTPError as exc:
            self.problems.append(f"malformed {path}: {type(exc).__name__}: {exc}")
            self.count("malformed, wrong answer")

    async def probe(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                r = await client.get(self.base + "/health", timeout=10)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            self.health_ms.append((time.perf_counter() - t) * 1000)
            if not ok:
                self.count("/health failed")
            await asyncio.sleep(0.05)

    async def load(self) -> float:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(self.args.request_timeout_s)
        async with httpx.AsyncClient(base_url=self.base, limits=limits, timeout=timeout) as client, \
                httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as health_client:
            stop = asyncio.Event()
            probe = asyncio.create_task(self.probe(health_client, stop))
            tasks = []
            started = time.perf_counter()
            for i in range(self.args.requests):
                await asyncio.sleep(self.rng.expovariate(self.args.rate))
                abort = self.rng.random() < self.args.abort_fraction
                abort_after = self.rng.uniform(0.0, self.args.abort_within_s) if abort else None
                tasks.append(asyncio.create_task(self.one(client, i, abort_after)))
                if self.rng.random() < self.args.malformed_fraction:
                    tasks.append(asyncio.create_task(self.malformed(client)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            stop.set()
            await probe
            return elapsed


def warm_up(base: str, n: int) -> None:
    with httpx.Client(base_url=base, timeout=120) as c:
        for i in range(n):
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8, "temperature": 0.8, "seed": i}
            c.post("/v1/completions", json=body).raise_for_status()
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                 "stream": True}).raise_for_status()


def settle(base: str, timeout_s: float) -> dict[str, float]:
    """/metrics once running, waiting and the KV cache in use are 0 (or the last reading after timeout_s)."""
    deadline = time.time() + timeout_s
    while True:
        m = read_metrics(base)
        idle = (m.get("pernode:num_requests_running") == 0 and m.get("pernode:num_requests_waiting") == 0
                and m.get("pernode:kv_cache_usage_perc") == 0)
        if idle or time.time() > deadline:
            return m
        time.sleep(0.5)


def tiny_model_folder() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny_model import write_tiny_model  # the tests' tiny random model (lazy: only for --tiny)

    return write_tiny_model(os.path.join(tempfile.mkdtemp(prefix="pernode-soak-"), "tiny-llama"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="serve the tests' tiny random model (a quick run)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals per second (above capacity)")
    p.add_argument("--max-tokens", type=int, default=8, help="each request asks for 1..N tokens")
    p.add_argument("--abort-fraction", type=float, default=0.2)
    p.add_argument("--abort-within-s", type=float, default=3.0, help="an abort comes 0..N s after sending")
    p.add_argument("--malformed-fraction", type=float, default=0.1, help="malformed requests per request")
    p.add_argument("--warm-up", type=int, default=20, help="sequential warm-up requests")
    p.add_argument("--warm-up-requests", type=int, default=300,
                   help="then a warm-up burst of this many requests like the soak's, before the RSS baseline")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--server-args", default="", help="extra flags for pernode serve")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = tiny_model_folder() if args.tiny else args.model
    port = free_port()
    cmd = [sys.executable, "-m", "pernode.cli", "serve", "--model", model, "--port", str(port),
           "--log-level", "warning", *args.server_args.split()]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("server did not become healthy")
            time.sleep(0.5)
        warm_up(base, args.warm_up)
        if args.warm_up_requests:  # a burst at the same rate first: the allocators' high-water mark is not a leak
            asyncio.run(Soak(base, argparse.Namespace(**{**vars(args), "requests": args.warm_up_requests,
                                                          "seed": args.seed + 1})).load())
        settle(base, 60)
        rss_base = rss_bytes(server.pid)
        load_before = os.getloadavg()

        soak = Soak(base, args)
        elapsed = asyncio.run(soak.load())
        load_during = os.getloadavg()
        m = settle(base, 60)
        time.sleep(1.0)
        rss_after = rss_bytes(server.pid)
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    lost, hung = soak.counts.get("lost", 0), soak.counts.get("hung", 0)
    running, waiting = m.get("pernode:num_requests_running"), m.get("pernode:num_requests_waiting")
    kv = m.get("pernode:kv_cache_usage_perc")
    rss_change = rss_after / rss_base - 1
    p50, p99 = percentile(soak.health_ms, 50), percentile(soak.health_ms, 99)
    checks = {
        "0 lost or hung": lost == 0 and hung == 0 and soak.counts.get("malformed, wrong answer", 0) == 0,
        "running, waiting, KV in use back to 0": running == 0 and waiting == 0 and kv == 0,
        "RSS within 5% of baseline": abs(rss_change) <= 0.05,
        "p99 /health < 100 ms": p99 < 100 and soak.counts.get("/health failed", 0) == 0,
        "server alive": alive,
    }
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"model: {'tiny random (tests/tiny_model.py)' if args.tiny else args.model}; {args.requests} requests "
          f"at {args.rate:g}/s Poisson, 1..{args.max_tokens} output tokens, {args.abort_fraction:.0%} aborted "
          f"within {args.abort_within_s:g} s, {args.malformed_fraction:.0%} malformed interleaved")
    print(f"load finished in {elapsed:.1f} s (arrivals offered at {args.rate:g}/s; {args.requests / elapsed:.1f} req/s "
          f"through to the end)")
    for key, value in sorted(soak.counts.items()):
        print(f"  {key}: {value}")
    print(f"after: running {running:g}, waiting {waiting:g}, KV cache in use {kv:.3f}; "
          f"preemptions {m.get('pernode:num_preemptions_total', float('nan')):g}, "
          f"generated tokens {m.get('pernode:generation_tokens_total', float('nan')):g}")
    print(f"RSS: baseline {rss_base / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB ({rss_change:+.1%})")
    print(f"/health: {len(soak.health_ms)} probes, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {max(soak.health_ms, default=float('nan')):.1f} ms")
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, at the end "
          f"{' '.join(f'{x:.2f}' for x in load_during)}; {os.cpu_count()} CPUs")
    for problem in soak.problems[:20]:
        print("  problem:", problem)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
