"""The serving path under load: what it adds per request and per streamed token while several streams run at once,
through the path a fleet really serves by (Ray Serve's proxy into a pinned replica) or straight to `pernode serve`.

At each concurrency level c (default 1, 2, 4, 8) a round sends c different prompts of one length at once, twice:
straight into an in-process engine built from the same settings (already tokenized, stepped to the end) and over
HTTP through the path, alternating which half goes first (A-B, B-A, ...), so a load that drifts falls on both
halves alike (paired_difference.py). Per round: mean HTTP TTFT minus mean direct TTFT, and mean HTTP TPOT minus
mean direct TPOT over the c streams. At c streams one decode step gives each stream a token, so the TPOT
difference is what the path adds to a step that streams c tokens; a line through the per-level medians,

    added TPOT(c) = step_s + c * token_s,

summarizes it as a fixed part per step and a part per running stream (least squares; a negative intercept is
refitted through the origin, a negative slope planned as 0, and both are said). What a plan adds per decode step is
the measured curve itself (`per_step_curve`: the per-level medians, never falling, interpolated between stream
counts), since through Ray the cost per stream falls as streams grow and no line follows it at both ends.

Both are read off the serving threads' own CPU time per decode step: every thread of the serving process but the
engine's (which names itself `pernode-engine`), from their schedstat, less their idle background rate. On the
replica's core each such second delays the engine's steps, by the core or by the GIL. CPU time hardly moves with
the neighbours' load, wall time does; the wall-time line is kept beside it. (The process's CPU time beyond the
in-process engine's, measured before, mixed the serving work with any difference between two engines' step costs
and came out negative straight to `pernode serve`; the server's engine thread's CPU per step is kept beside the
in-process engine's as a check.) With prefill points timed in the same run,
`idle_start_s` is the one-stream direct TTFT beyond the profile's back-to-back prefill: a step that starts on an
idle engine pays it (price/replica.py). The per-request term is the
way in and out at one stream: the client's TTFT less the server's own first steps (its /metrics: first scheduled
step to first token), or, where the server has no /metrics, the paired TTFT difference. The planner adds `request_s` before a request reaches the engine and
`step_s + b * token_s` to every decode step of b streams (price/step_time.py), since that work runs on the
replica's own core. This is vidur's approach to a replica's non-model overheads (Agrawal et al., arXiv
2405.05465: CPU overheads profiled and added per batch), measured here against the serving path's own stack.

While the HTTP half runs, this thread moves to the client's cores (`client_cores`) so that parsing the stream
does not land on the replica's core, as in `fleet validate` with `--client-cpuset`; for the direct half it moves
back. The replica is pinned to this process's own cores (where the profile was taken).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import time
from typing import Callable, Iterator, Sequence

import httpx
import numpy as np

from pernode.measure.bench.bench_serve import send_request, served_model_name
from pernode.measure.bench.config import BenchConfig
from pernode.measure.bench.datasets import BenchRequest, word_prompt
from pernode.measure.bench.server_timing import mean_s, scrape_server_timing
from pernode.measure.profile.serving_path_fit import StreamTiming, added_cpu_s, summarize_streams
from pernode.measure.profile.serving_path_servers import ServerCpu
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams

DEFAULT_STREAMS = (1, 2, 4, 8)
DEFAULT_ROUNDS = 6
WARMUP_ROUNDS = 1
DEFAULT_INPUT_LEN = 64
DEFAULT_OUTPUT_LEN = 32
GAP_S = 0.2
PATHS = ("serve", "ray")


def _prompts(engine: LLMEngine, n: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=1)
    tokenize = lambda text: engine.validate_prompt(text, params)  # noqa: E731 - the server's own tokenizing
    out = []
    for _ in range(n):
        text, n_tok = word_prompt(rng, input_len, tokenize)
        out.append(BenchRequest(prompt=text, messages=None, prompt_len=n_tok, max_tokens=output_len))
    return out


def time_direct_streams(engine: LLMEngine, prompts: Sequence[Sequence[int]], max_tokens: int) -> StreamTiming:
    """c requests added at once to the engine and stepped to the end; their mean TTFT and TPOT."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tag = time.monotonic_ns()
    start = time.perf_counter()
    ids = [f"streams-{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, list(p), params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    produced: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.outputs:
                continue
            n = len(out.outputs[0].token_ids)
            if n > produced.get(out.request_id, 0):
                now = time.perf_counter()
                first.setdefault(out.request_id, now)
                last[out.request_id], produced[out.request_id] = now, n
    if set(first) != set(ids) or min(produced.values()) < 2:
        raise RuntimeError("serving path: a direct request produced fewer than two tokens")
    ttft = statistics.fmean(first[r] - start for r in ids)
    tpot = statistics.fmean((last[r] - first[r]) / (produced[r] - 1) for r in ids)
    return StreamTiming(ttft, tpot)


@contextlib.contextmanager
def on_cores(cores: set[int] | None) -> Iterator[None]:
    """Run this thread on `cores` for the block (None: leave it where it is)."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def _http_streams(client: httpx.AsyncClient, model: str, config: BenchConfig, timeout: httpx.Timeout,
                        requests: Sequence[BenchRequest], url: str) -> StreamTiming:
    timings = await asyncio.gather(*(send_request(client, i, r, model, config, timeout)
                                     for i, r in enumerate(requests)))
    for t in timings:
        if not t.success or t.num_output_tokens < 2:
            raise RuntimeError(f"serving path: a request to {url} failed: {t.error or 'fewer than two tokens'}")
    return StreamTiming(statistics.fmean(t.ttft_s for t in timings), statistics.fmean(t.tpot_s for t in timings))


def _first_steps_s(before: dict | None, after: dict | None) -> float | None:
    """The server's mean time from a request's first scheduled step to its first token between two readings of
    its /metrics (the engine's part of TTFT); None when it has no /metrics (Ray's proxy routes it to the replica)."""
    if before is None or after is None:
        return None
    ttft, queue = mean_s(before, after, "ttft"), mean_s(before, after, "queue")
    return None if ttft is None or queue is None else ttft - queue


def _split(cpu: ServerCpu | float) -> tuple[float, float | None]:
    """(serving threads' CPU, engine thread's CPU or None) from a server CPU reading; a float is the process's."""
    if isinstance(cpu, ServerCpu):
        return (cpu.serving_s, cpu.engine_s) if cpu.engine_s is not None else (cpu.total_s, None)
    return float(cpu), None


async def _rounds(engine: LLMEngine, url: str, streams: Sequence[int], rounds: int, input_len: int,
                  output_len: int, client_cores: set[int] | None, seed: int,
                  server_cpu: Callable[[], ServerCpu | float] | None) -> dict[int, list]:
    """{c: [(direct, http), ...]} after WARMUP_ROUNDS dropped per level."""
    config = BenchConfig(base_url=url, ignore_eos=True, temperature=0.0)
    timeout = httpx.Timeout(connect=30.0, read=config.request_timeout_s, write=30.0, pool=None)
    out: dict[int, list] = {}
    k = 0
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=max(streams) + 4)) as client:
        model = await served_model_name(client, url)
        for c in streams:
            out[c] = []
            for r in range(rounds + WARMUP_ROUNDS):
                reqs = _prompts(engine, c, input_len, output_len, seed + 1000 * c + r)  # fresh: no prefix hits
                ids = [engine.validate_prompt(q.prompt, SamplingParams(max_tokens=output_len)) for q in reqs]
                http_reqs = _prompts(engine, c, input_len, output_len, seed + 1000 * c + r + 500)
                halves = {}
                for half in (("direct", "http") if k % 2 == 0 else ("http", "direct")):
                    wall0, own0 = time.perf_counter(), time.thread_time()
                    server0 = server_cpu() if server_cpu else None
                    if half == "direct":
                        t = time_direct_streams(engine, ids, output_len)
                    else:
                        with on_cores(client_cores):
                            timing0 = scrape_server_timing(url)
                            t = await _http_streams(client, model, config, timeout, http_reqs, url)
                            t = dataclasses.replace(t, server_first_steps_s=_first_steps_s(timing0,
                                                                                           scrape_server_timing(url)))
                    wall = time.perf_counter() - wall0
                    serving, server_engine = _split(server_cpu() - server0) if server_cpu else (None, None)
                    if half == "direct":
                        t = dataclasses.replace(t, cpu_s=time.thread_time() - own0, wall_s=wall,
                                                server_cpu_s=serving)
                    else:
                        t = dataclasses.replace(t, cpu_s=serving, wall_s=wall, engine_cpu_s=server_engine)
                    halves[half] = t
                    await asyncio.sleep(GAP_S)
                k += 1
                d, h = halves["direct"], halves["http"]
                if r >= WARMUP_ROUNDS:
                    out[c].append((d, h))
                label = "warm-up" if r < WARMUP_ROUNDS else f"{r + 1 - WARMUP_ROUNDS}/{rounds}"
                extra = added_cpu_s(d, h)
                print(f"serving path: {c} stream(s), round {label}: TTFT direct {d.ttft_s * 1e3:.1f} / HTTP "
                      f"{h.ttft_s * 1e3:.1f} ms, TPOT direct {d.tpot_s * 1e3:.2f} / HTTP {h.tpot_s * 1e3:.2f} ms"
                      + ("" if extra is None else f", serving CPU {extra * 1e3 / output_len:+.2f} ms per step"),
                      flush=True)
    return out


def measure_streams(engine: LLMEngine, url: str, path: str, streams: Sequence[int] = DEFAULT_STREAMS,
                    rounds: int = DEFAULT_ROUNDS, input_len: int = DEFAULT_INPUT_LEN,
                    output_len: int = DEFAULT_OUTPUT_LEN, client_cores: set[int] | None = None,
                    layout: dict | None = None, seed: int = 0,
                    server_cpu: Callable[[], ServerCpu | float] | None = None,
                    warm_prefill: Sequence[dict] | None = None, plan_engine_ratio: bool = False) -> dict:
    """Time `rounds` paired rounds at each stream count against the server at `url`; the serving_path section."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}: allowed {', '.join(PATHS)}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: allowed >= 1")
    if not streams or any(c < 1 for c in streams):
        raise ValueError(f"streams={list(streams)}: allowed a list of counts >= 1")
    if input_len < 1 or output_len < 2:
        raise ValueError(f"input_len={input_len}, output_len={output_len}: allowed >= 1 and >= 2 tokens")
    load_before = os.getloadavg()[0]
    by_level = asyncio.run(_rounds(engine, url, sorted(set(streams)), rounds, input_len, output_len,
                                   client_cores, seed, server_cpu))
    return summarize_streams(by_level, path, input_len, output_len, (load_before, os.getloadavg()[0]),
                             layout or {}, warm_prefill, plan_engine_ratio)


def parse_streams(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"serving_path_streams={text!r}: allowed a comma-separated list of integers >= 1") from None
    if not out or any(c < 1 for c in out):
        raise ValueError(f"serving_path_streams={text!r}: allowed a comma-separated list of integers >= 1")
    return out


__all__ = ["DEFAULT_STREAMS", "PATHS", "measure_streams", "on_cores", "parse_streams", "time_direct_streams"]

