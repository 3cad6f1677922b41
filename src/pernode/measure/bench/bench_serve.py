"""`pernode bench serve`: a load generator for any OpenAI-compatible server (pernode, llama.cpp, vLLM).

Streams `/v1/completions` (or `/v1/chat/completions` for chat prompts), sends on a gamma arrival schedule capped by
`--max-concurrency`, and reports vLLM benchmark_serving's metrics (see serving_metrics.py for the definitions).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import json
import math
import time
from typing import Sequence

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pernode.measure.bench.arrivals import arrival_offsets_s
from pernode.measure.bench.bench_result import LATENCY_METRICS, BenchResult, RequestRecord, ServingMetrics
from pernode.measure.bench.config import BenchConfig
from pernode.measure.bench.datasets import (BenchRequest, chat_requests, jsonl_requests, load_tokenizer,
                                            random_requests)
from pernode.measure.bench.serving_metrics import (RequestTimeline, compute_serving_metrics, parse_slo,
                                                   per_request_records)
from pernode.progress import output_console, progress


def build_requests(config: BenchConfig) -> list[BenchRequest]:
    """The run's requests, seeded: the same config sends the same prompts."""
    tokenize = load_tokenizer(config.tokenizer) if config.tokenizer else None
    if config.dataset == "random":
        return random_requests(config.num_prompts, config.input_len_range, config.output_len_range,
                               seed=config.seed, tokenize=tokenize)
    if config.dataset == "jsonl":
        return jsonl_requests(config.dataset_path, config.num_prompts, config.jsonl_max_tokens, tokenize)
    return chat_requests(config.num_prompts, seed=config.seed, tokenize=tokenize)


WARMUP_MAX_TOKENS = 16  # enough to run prefill and a few decode steps; a warm-up need not be long


def build_warmup_requests(config: BenchConfig, requests: list[BenchRequest]) -> list[BenchRequest]:
    """Short requests shaped like the run's. Random prompts are fresh ones, so the measured requests get no
    prefix-cache hit from the warm-up (vLLM's tool reuses the first prompt)."""
    n = config.num_warmup
    if config.dataset == "random" and n:
        fresh = random_requests(n, config.input_len_range, (1, 1), seed=config.seed + 1_000_003)
    else:
        fresh = [requests[i % len(requests)] for i in range(n)]
    return [dataclasses.replace(r, max_tokens=min(r.max_tokens, WARMUP_MAX_TOKENS)) for r in fresh]


def request_body(req: BenchRequest, model: str, config: BenchConfig) -> tuple[str, dict]:
    """The endpoint path and JSON body for one request."""
    body: dict = {"model": model, "max_tokens": req.max_tokens, "temperature": config.temperature, "stream": True,
                  # usage in the last chunk gives the true token counts (a chunk may carry several tokens).
                  "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if req.messages is not None:
        body["messages"] = req.messages
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt
    return "/v1/completions", body


def chunk_text(choice: dict) -> str:
    """The generated text of one streamed choice, for completions (`text`) or chat (`delta.content`)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking separately; it is generated output all the same.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def send_request(client: httpx.AsyncClient, index: int, req: BenchRequest, model: str,
                       config: BenchConfig, timeout: httpx.Timeout) -> RequestTimeline:
    """Send one streaming request and time every content chunk. Never raises for server or network errors."""
    path, body = request_body(req, model, config)
    t = RequestTimeline(index=index, send_time_s=time.perf_counter(), prompt_tokens=req.prompt_len,
                        requested_output_tokens=req.max_tokens)
    try:
        async with client.stream("POST", path, json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                t.success, t.error = False, f"HTTP {resp.status_code}: {text[:300]}"
                return t
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # SSE comments, event names, blank separators
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    err = obj["error"]
                    message = err.get("message", err) if isinstance(err, dict) else err
                    t.success, t.error = False, f"stream error: {message}"
                    return t
                choices = obj.get("choices") or []
                if choices and chunk_text(choices[0]):
                    t.chunk_times_s.append(now)
                usage = obj.get("usage")
                if usage:
                    if usage.get("completion_tokens") is not None:
                        t.output_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens"):
                        t.prompt_tokens = int(usage["prompt_tokens"])
    except Exception as e:  # a benchmark lists failures; it does not stop at the first one
        t.success, t.error = False, f"{type(e).__name__}: {e}"
    return t


async def served_model_name(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists: what to send when the config names none."""
    try:
        r = await client.get("/v1/models", timeout=10.0)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:
        raise RuntimeError(f"model unset and GET {base_url}/v1/models failed ({type(e).__name__}: {e}); check "
                           f"the server is up at base_url={base_url} or set model") from None


async def run_bench_async(config: BenchConfig) -> BenchResult:
    """The benchmark itself; `run_bench` wraps it for synchronous callers."""
    base_url = config.server_url
    percentiles = config.percentile_values
    slo = parse_slo(config.slo)
    requests = build_requests(config)
    offsets_s = arrival_offsets_s(len(requests), config.request_rate, config.burstiness, config.seed)

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # No pool limit below the concurrency cap: a request queued for a connection would have its wait
    # counted as TTFT.
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(connect=30.0, read=config.request_timeout_s, write=30.0, pool=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:
        model = config.model or await served_model_name(client, base_url)
        for w, warm_req in enumerate(build_warmup_requests(config, requests)):
            warm = await send_request(client, -1 - w, warm_req, model, config, timeout)
            if not warm.success:
                raise RuntimeError(f"warm-up request to {base_url} failed: {warm.error}; check base_url, model "
                                   f"and the server log (or set num_warmup=0 to skip the check)")

        sem = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

        async def limited(i: int, req: BenchRequest) -> RequestTimeline:
            if sem is None:
                return await send_request(client, i, req, model, config, timeout)
            async with sem:
                return await send_request(client, i, req, model, config, timeout)

        progress = None if config.no_progress else _progress()
        task_id = progress.add_task("bench serve", total=len(requests)) if progress else None
        if progress:
            progress.start()
        started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        start_s = time.perf_counter()
        tasks = []
        try:
            for i, req in enumerate(requests):
                # Absolute send times, so the sleeps' overshoot does not accumulate and lower the rate.
                wait_s = start_s + offsets_s[i] - time.perf_counter()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                task = asyncio.create_task(limited(i, req))
                if progress:
                    task.add_done_callback(lambda _: progress.advance(task_id))
                tasks.append(task)
            timelines = await asyncio.gather(*tasks)
        finally:
            if progress:
                progress.stop()
        duration_s = time.perf_counter() - start_s

    metrics = compute_serving_metrics(timelines, duration_s, slo, percentiles)
    endpoints = sorted({r.endpoint for r in requests})
    return BenchResult(
        started_at=started_at, base_url=base_url, model=model,
        endpoint=endpoints[0] if len(endpoints) == 1 else "mixed",
        dataset=config.dataset, dataset_path=config.dataset_path, num_prompts=len(requests),
        request_rate=config.request_rate, burstiness=config.burstiness, max_concurrency=config.max_concurrency,
        seed=config.seed, ignore_eos=bool(config.ignore_eos), percentiles=percentiles,
        metrics=ServingMetrics.from_dict(metrics, percentiles),
        notes=tuple(_notes(timelines, config)),
        per_request=tuple(RequestRecord.from_dict(row) for row in per_request_records(timelines)))


def _notes(timelines: Sequence[RequestTimeline], config: BenchConfig) -> list[str]:
    notes = []
    ok = [t for t in timelines if t.success and t.chunk_times_s]
    asked = sum(t.requested_output_tokens or 0 for t in ok)
    got = sum(t.num_output_tokens for t in ok)
    if asked and got < 0.9 * asked:
        hint = "" if config.ignore_eos else "; set ignore_eos to hold output lengths to max_tokens"
        notes.append(f"outputs averaged {got / len(ok):.1f} tokens against {asked / len(ok):.1f} asked "
                     f"(the server stopped early){hint}")
    if ok and all(t.output_tokens is None for t in ok):
        notes.append("the server sent no usage; output tokens are counted as content chunks")
    return notes


def _progress():
    return progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def run_bench(config: BenchConfig) -> BenchResult:
    """Run the benchmark `config` describes; write `config.out` (the result's JSON) if given; return the result."""
    result = asyncio.run(run_bench_async(config))
    if config.out:
        result.save(config.out)
    return result


def print_bench_table(result: BenchResult, console: Console | None = None) -> None:
    """The result as a rich table, laid out like vLLM's summary."""
    console = console or output_console()
    m = result.metrics
    table = Table(title=f"bench serve: {result.model} @ {result.base_url} ({result.endpoint})")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v, digits=2):
        return "-" if v is None else (f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}")

    rate = "inf" if math.isinf(result.request_rate) else result.request_rate
    table.add_row("request rate (req/s) / burstiness", f"{rate} / {result.burstiness}")
    table.add_row("max concurrency", fmt(result.max_concurrency))
    table.add_row("successful / failed requests", f"{m.completed} / {m.failed}")
    table.add_row("benchmark duration (s)", fmt(m.duration_s))
    table.add_row("total input / output tokens", f"{m.total_input_tokens:,} / {m.total_output_tokens:,}")
    table.add_row("request throughput (req/s)", fmt(m.request_throughput_per_s))
    if m.request_goodput_per_s is not None:
        slo = ",".join(f"{k}={v:g}" for k, v in m.slo.items() if v is not None)
        table.add_row(f"request goodput (req/s) [{slo}]", fmt(m.request_goodput_per_s))
    table.add_row("output token throughput (tok/s)", fmt(m.output_throughput_tok_s))
    table.add_row("total token throughput (tok/s)", fmt(m.total_token_throughput_tok_s))
    labels = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
    for name in LATENCY_METRICS:
        stats, label = m.latency(name), labels[name]
        table.add_section()
        table.add_row(f"mean / median / std {label} (ms)",
                      " / ".join(fmt(v) for v in (stats.mean_ms, stats.median_ms, stats.std_ms)))
        for p, value in stats.percentiles_ms:
            table.add_row(f"p{p:g} {label} (ms)", fmt(value))
    console.print(table)
    for f in m.failed_requests[:10]:
        console.print(f"[red]failed request {f.index}[/red]: {f.error}")
    if m.failed > 10:
        console.print(f"... and {m.failed - 10} more failures (all listed in the JSON)")
    for note in result.notes:
        console.print(f"[yellow]note[/yellow]: {note}")
