"""What the serving path adds to the engine's own times: HTTP, the server's tokenizing, detokenizing and
streaming, measured as paired differences against a real `pernode serve` on loopback with the same engine flags.

Each pair sends the same prompt twice, one request at a time (no queueing): once straight into an in-process
engine built from the same settings, once through HTTP to the server, alternating which goes first (A-B, B-A, ...)
so a load that drifts during the run falls on both halves alike. Per request: HTTP TTFT minus direct TTFT; per
token: HTTP TPOT minus direct TPOT. The median of the paired differences is reported with an order-statistics
interval and its quartiles (paired_difference.py); when the interval holds 0 the result says the difference is
below this run's noise instead of clamping it. The planner adds them (price/step_time.py): the request's share
before the engine sees it, the token's share to every decode step, since streaming runs on the engine's own core.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import httpx
import numpy as np

from pernode.measure.bench.bench_serve import send_request, served_model_name
from pernode.measure.bench.config import BenchConfig, parse_token_range
from pernode.measure.bench.datasets import BenchRequest, word_prompt
from pernode.measure.profile.paired_difference import paired_difference
from pernode.measure.profile.serving_path_servers import pernode_serve
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams

DEFAULT_PAIRS = 12
DEFAULT_INPUT_LEN = "32:256"
DEFAULT_OUTPUT_LEN = "32"
WARMUP_PAIRS = 2
GAP_S = 0.2  # between the halves of a pair: the other side finishes its own bookkeeping and goes idle first


@dataclass(frozen=True)
class Timing:
    """One request's TTFT and TPOT (None with a single output token)."""

    ttft_s: float
    tpot_s: float | None
    output_tokens: int


def time_direct(engine: LLMEngine, prompt_ids: Sequence[int], max_tokens: int) -> Timing:
    """One request straight into the engine (already tokenized), stepped to the end: the engine's own TTFT and
    TPOT, defined as the bench client defines them over HTTP."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request_id = f"serving-path-direct-{time.monotonic_ns()}"
    start = time.perf_counter()
    engine.add_request(request_id, list(prompt_ids), params)
    first = last = None
    produced = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id or not out.outputs:
                continue
            n = len(out.outputs[0].token_ids)
            if n > produced:
                now = time.perf_counter()
                first = now if first is None else first
                last, produced = now, n
    if first is None:
        raise RuntimeError("serving path: the direct engine request produced no token")
    tpot = (last - first) / (produced - 1) if produced > 1 else None
    return Timing(first - start, tpot, produced)


def _prompts(engine: LLMEngine, num: int, input_len: str, output_len: str, seed: int) -> list[BenchRequest]:
    lo_in, hi_in = parse_token_range(input_len, "input_len")
    lo_out, hi_out = parse_token_range(output_len, "output_len")
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=1)
    tokenize = lambda text: engine.validate_prompt(text, params)  # noqa: E731 - the server's own tokenizing
    out = []
    for _ in range(num):
        text, n_tok = word_prompt(rng, int(rng.integers(lo_in, hi_in + 1)), tokenize)
        out.append(BenchRequest(prompt=text, messages=None, prompt_len=n_tok,
                                max_tokens=int(rng.integers(lo_out, hi_out + 1))))
    return out


async def _paired_timings(engine: LLMEngine, url: str, requests: list[BenchRequest],
                          warmup: int) -> list[tuple[Timing, Timing]]:
    """(direct, http) per request, alternating which side goes first; the first `warmup` pairs are dropped."""
    config = BenchConfig(base_url=url, ignore_eos=True, temperature=0.0)
    timeout = httpx.Timeout(connect=30.0, read=config.request_timeout_s, write=30.0, pool=None)
    pairs = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        model = await served_model_name(client, url)

        async def over_http(i: int, req: BenchRequest) -> Timing:
            t = await send_request(client, i, req, model, config, timeout)
            if not t.success or not t.chunk_times_s:
                raise RuntimeError(f"serving path: request {i} to {url} failed: {t.error or 'no tokens came back'}")
            return Timing(t.ttft_s, t.tpot_s, t.num_output_tokens)

        for i, req in enumerate(requests):
            ids = engine.validate_prompt(req.prompt, SamplingParams(max_tokens=req.max_tokens))
            if i % 2 == 0:
                direct = time_direct(engine, ids, req.max_tokens)
                await asyncio.sleep(GAP_S)
                http = await over_http(i, req)
            else:
                http = await over_http(i, req)
                await asyncio.sleep(GAP_S)
                direct = time_direct(engine, ids, req.max_tokens)
            await asyncio.sleep(GAP_S)
            if i >= warmup:
                pairs.append((direct, http))
            label = "warm-up" if i < warmup else f"{i + 1 - warmup}/{len(requests) - warmup}"
            print(f"serving path: pair {label}: TTFT direct {direct.ttft_s * 1e3:.1f} ms, HTTP "
                  f"{http.ttft_s * 1e3:.1f} ms", flush=True)
    return pairs


def summarize_pairs(pairs: list[tuple[Timing, Timing]], input_len: str, output_len: str,
                    load_before: float, load_after: float) -> dict:
    """The profile's serving_path section from (direct, http) timings of the same requests."""
    request = paired_difference([d.ttft_s for d, _ in pairs], [h.ttft_s for _, h in pairs])
    with_tokens = [(d, h) for d, h in pairs if d.tpot_s is not None and h.tpot_s is not None]
    token = (paired_difference([d.tpot_s for d, _ in with_tokens], [h.tpot_s for _, h in with_tokens])
             if with_tokens else None)
    notes = [request.describe("per request (HTTP TTFT - direct TTFT)")]
    notes.append(token.describe("per token (HTTP TPOT - direct TPOT)") if token else
                 "per token: no request produced two tokens; planned as 0 ms")
    return {
        "request_s": request.planned_s,
        "token_s": token.planned_s if token else 0.0,
        "request": request.to_dict(),
        "token": token.to_dict() if token else None,
        "below_noise": request.below_noise or (token.below_noise if token else True),
        "requests": len(pairs),
        "pairs": len(pairs),
        "ttft_p50_s": statistics.median(h.ttft_s for _, h in pairs),
        "tpot_p50_s": statistics.median(h.tpot_s for _, h in with_tokens) if with_tokens else None,
        "direct_ttft_p50_s": statistics.median(d.ttft_s for d, _ in pairs),
        "direct_tpot_p50_s": statistics.median(d.tpot_s for d, _ in with_tokens) if with_tokens else None,
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "input_len": input_len, "output_len": output_len,
        "notes": notes,
        "method": "paired: each prompt sent straight into an in-process engine with the same settings and over "
                  "HTTP to `pernode serve` on loopback, one request at a time, alternating which goes first; "
                  "medians of the paired differences with an order-statistics interval (never clamped: a "
                  "difference whose interval holds 0 is flagged below the noise)",
    }


def measure_serving_path(engine: LLMEngine, engine_flags: Sequence[str], num_pairs: int = DEFAULT_PAIRS,
                         input_len: str = DEFAULT_INPUT_LEN, output_len: str = DEFAULT_OUTPUT_LEN,
                         seed: int = 0, timeout_s: float = 600.0) -> dict:
    """Start `pernode serve ENGINE_FLAGS` on a free loopback port beside `engine` (built from the same flags),
    time `num_pairs` prompts both ways, stop the server, and return the profile's serving_path section.
    Two engines are in memory meanwhile: the server's and this one."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs}: allowed >= 1")
    requests = _prompts(engine, num_pairs + WARMUP_PAIRS, input_len, output_len, seed)
    with pernode_serve(engine_flags, timeout_s) as server:
        print(f"serving path: pernode serve up on {server.url}; {num_pairs} prompts, each straight into the engine "
              f"and over HTTP, alternating", flush=True)
        load_before = os.getloadavg()[0]
        pairs = asyncio.run(_paired_timings(engine, server.url, requests, WARMUP_PAIRS))
        load_after = os.getloadavg()[0]
    return summarize_pairs(pairs, input_len, output_len, load_before, load_after)
