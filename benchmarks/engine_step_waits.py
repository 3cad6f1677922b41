"""Does serving slow the engine's steps? The same chat-shaped Poisson trace, replayed into an in-process engine and
over HTTP into a `pernode serve` on the same core, with every step's wall and CPU time counted on both sides.

The profile times an engine stepping alone; the planner adds to each step the serving threads' CPU measured at
several streams (price/step_time.py). Under a live trace a server's steps may also wait: for the core, while its
event loop parses, tokenizes and streams, or blocked on the GIL the event loop holds (neither is the engine
thread's CPU). Per round this prints, for each side, per step: wall, the engine thread's CPU inside the steps,
the wall beyond it, split by the thread's schedstat into waiting for the core (run queue) and blocked (the GIL,
a lock); and the serving threads' CPU over the round. If the server's wall per step beyond the in-process
engine's is about the serving threads' CPU per step, the planner's serving term holds it; if more, something
blocks the steps that no term has.

Rounds alternate which side goes first (A-B, B-A). The server is on `--server-core` (this process's core while the
in-process engine steps), the HTTP client on `--client-core`, as `fleet validate` lays out a replica and its load
generator. Timings move with the machine's load; the wall-beyond-CPU split and the server/in-process ratios within
a round are what to read.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/engine_step_waits.py [--rate 3] [--num-requests 40] [--rounds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import threading
import time

import httpx
import numpy as np

from pernode.config import EngineConfig
from pernode.measure.bench.bench_serve import send_request, served_model_name
from pernode.measure.bench.config import BenchConfig
from pernode.measure.bench.datasets import BenchRequest, word_prompt
from pernode.measure.bench.server_timing import parse_engine_steps
from pernode.measure.profile.serving_path_servers import pernode_serve, server_cpu_s
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.engine.step_clock import StepClock
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.server.async_engine import ENGINE_THREAD_NAME


def schedstat(pid: int | str, tid: int | str) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a core) of one thread so far."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        fields = f.read().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def engine_tid(pid: int) -> str:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip() == ENGINE_THREAD_NAME:
                return tid
    raise RuntimeError(f"no thread named {ENGINE_THREAD_NAME} in process {pid}")


def trace(engine: LLMEngine, n: int, rate: float, seed: int) -> list[tuple[float, str, list[int], int]]:
    """(arrival offset s, prompt text, its token ids, output tokens): 32-128 prompt tokens, 16-32 output."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=n)) - 0.0
    offsets -= offsets[0]
    params = SamplingParams(max_tokens=1)
    tokenize = lambda text: engine.validate_prompt(text, params)  # noqa: E731 - the server's own tokenizing
    out = []
    for t in offsets:
        text, _ = word_prompt(rng, int(rng.integers(32, 129)), tokenize)
        out.append((float(t), text, tokenize(text), int(rng.integers(16, 33))))
    return out


def direct_round(engine: LLMEngine, requests, tag: str) -> dict:
    """Replay the trace into the in-process engine: requests join at their arrival times, between steps."""
    clock = StepClock()
    tid = threading.get_native_id()
    cpu0, rq0 = schedstat(os.getpid(), tid)
    start = time.perf_counter()
    pending = list(enumerate(requests))
    tokens = 0
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            i, (_, _, ids, out_len) = pending.pop(0)
            engine.add_request(f"{tag}-{i}", list(ids),
                               SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
        if engine.has_unfinished_requests():
            tokens += sum(len(o.outputs[0].delta_token_ids) for o in clock.run(engine.step) if o.outputs)
        elif pending:
            time.sleep(max(0.0, pending[0][1][0] - (time.perf_counter() - start)))
    cpu1, rq1 = schedstat(os.getpid(), tid)
    steps, wall_s, cpu_s = clock.reading()
    # outside its steps this thread only sleeps or adds requests: its run-queue wait is the steps'
    return {"steps": steps, "tokens": tokens, "wall_s": wall_s, "cpu_s": cpu_s, "rq_s": rq1 - rq0,
            "serving_cpu_s": 0.0, "thread_cpu_s": cpu1 - cpu0}


def _generation_tokens(text: str) -> float:
    m = re.search(r"^pernode:generation_tokens_total(?:{[^}]*})?\s+(\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


async def _replay_http(url: str, requests) -> int:
    config = BenchConfig(base_url=url, ignore_eos=True, temperature=0.0)
    timeout = httpx.Timeout(connect=30.0, read=config.request_timeout_s, write=30.0, pool=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=256)) as client:
        model = await served_model_name(client, url)
        start = time.perf_counter()

        async def one(i, offset, text, ids, out_len):
            await asyncio.sleep(max(0.0, offset - (time.perf_counter() - start)))
            req = BenchRequest(prompt=text, messages=None, prompt_len=len(ids), max_tokens=out_len)
            return await send_request(client, i, req, model, config, timeout)

        results = await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
    return sum(1 for r in results if not r.success)


def http_round(url: str, pid: int, requests, client_core: int | None) -> dict:
    tid = engine_tid(pid)
    before = httpx.get(f"{url}/metrics").text
    cpu0, rq0 = schedstat(pid, tid)
    serving0 = server_cpu_s((pid,)).serving_s
    own = os.sched_getaffinity(0)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    try:
        failed = asyncio.run(_replay_http(url, requests))
    finally:
        os.sched_setaffinity(0, own)
    cpu1, rq1 = schedstat(pid, tid)
    serving1 = server_cpu_s((pid,)).serving_s
    after = httpx.get(f"{url}/metrics").text
    a, b = parse_engine_steps(before), parse_engine_steps(after)
    if a is None or b is None:
        raise RuntimeError("the server exports no pernode:engine_step_seconds: an older pernode serve")
    if failed:
        raise RuntimeError(f"{failed} HTTP requests failed")
    return {"steps": b["steps"] - a["steps"], "tokens": _generation_tokens(after) - _generation_tokens(before),
            "wall_s": b["step_wall_s"] - a["step_wall_s"], "cpu_s": b["step_cpu_s"] - a["step_cpu_s"],
            "rq_s": rq1 - rq0, "serving_cpu_s": serving1 - serving0, "thread_cpu_s": cpu1 - cpu0}


def per_step_ms(r: dict) -> dict:
    n = max(r["steps"], 1)
    beyond = r["wall_s"] - r["cpu_s"]
    return {"tokens/step": r["tokens"] / n, "wall": r["wall_s"] / n * 1e3, "cpu": r["cpu_s"] / n * 1e3,
            "beyond": beyond / n * 1e3, "rq": r["rq_s"] / n * 1e3, "blocked": (beyond - r["rq_s"]) / n * 1e3,
            "serving cpu": r["serving_cpu_s"] / n * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rate", type=float, default=3.0, help="arrivals per second (chat shape: ~4 is 90%% load)")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per side, alternating which side goes first")
    ap.add_argument("--server-core", type=int, default=0)
    ap.add_argument("--client-core", type=int, default=1)
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.server_core})
    flags = ["--model", args.model, "--device", "cpu", "--kv-cache-bytes", "256MiB", "--num-threads", "1",
             "--max-num-seqs", "116", "--max-queued-requests", "256"]
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", num_threads=1, kv_cache_bytes=256 * 2**20,
                                    max_num_seqs=116))
    load = [os.getloadavg()[0]]
    rows: dict[str, list[dict]] = {"in-process": [], "server": []}
    print(f"in-process engine loaded; starting pernode serve on core {args.server_core}", flush=True)
    with pernode_serve(flags) as server:
        pid = server.server_pids[0]
        print(f"server up at {server.url}; warming both sides", flush=True)
        warm = trace(engine, 4, 4.0, seed=99)
        direct_round(engine, warm, "warm")
        http_round(server.url, pid, warm, args.client_core)
        for r in range(args.rounds):
            requests = trace(engine, args.num_requests, args.rate, seed=r)
            order = ("in-process", "server") if r % 2 == 0 else ("server", "in-process")
            for side in order:
                res = (direct_round(engine, requests, f"r{r}") if side == "in-process"
                       else http_round(server.url, pid, requests, args.client_core))
                rows[side].append(res)
                m = per_step_ms(res)
                print(f"round {r + 1} {side:10s}: {res['steps']:5.0f} steps, " +
                      ", ".join(f"{k} {v:.2f}" for k, v in m.items()) + " (ms per step)", flush=True)
                time.sleep(0.5)
    load.append(os.getloadavg()[0])
    print(f"\nmedians over {args.rounds} rounds, ms per step (load average {load[0]:.2f}-{load[1]:.2f}; rate "
          f"{args.rate} req/s, {args.num_requests} requests):\n")
    keys = list(per_step_ms(rows["server"][0]))
    print("| side | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    med = {}
    for side, rs in rows.items():
        med[side] = {k: statistics.median(per_step_ms(x)[k] for x in rs) for k in keys}
        print(f"| {side} | " + " | ".join(f"{med[side][k]:.2f}" for k in keys) + " |")
    ratios = [per_step_ms(s)["cpu"] / per_step_ms(d)["cpu"] for s, d in zip(rows["server"], rows["in-process"])]
    print(f"\nserver / in-process engine CPU per step, per round: {', '.join(f'{x:.3f}' for x in ratios)}")
    extra = med["server"]["wall"] - med["in-process"]["wall"]
    print(f"server wall per step beyond the in-process engine's: {extra:+.2f} ms; the serving threads' CPU per step: "
          f"{med['server']['serving cpu']:.2f} ms; blocked (not CPU, not run queue): server "
          f"{med['server']['blocked']:.2f} ms, in-process {med['in-process']['blocked']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
