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
from pathlib import Path
from typing import Sequence

import httpx

from pernode.measure.bench.config import BenchConfig
from pernode.measure.bench.arrivals import arrival_offsets_s, check_rate
from pernode.measure.bench.datasets import (DATASETS, BenchRequest, chat_requests, jsonl_requests, load_tokenizer,
                                      parse_len_range, random_requests)
from pernode.measure.bench.serving_metrics import (RequestTimeline, compute_serving_metrics, parse_slo,
                                             per_request_records)


def normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {url!r}: must start with http:// or https://, e.g. http://127.0.0.1:8000")
    return url


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--percentiles {text!r}: expected comma-separated numbers, e.g. 50,90,99") from None
    bad = [p for p in ps if not 0 <= p <= 100]
    if bad or not ps:
        raise ValueError(f"--percentiles {text!r}: each must be in [0, 100]")
    return ps


def build_requests(args: BenchConfig) -> list[BenchRequest]:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts {args.num_prompts}: must be >= 1")
    tokenize = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.dataset == "random":
        return random_requests(args.num_prompts, parse_len_range(args.random_input_len, "--random-input-len"),
                               parse_len_range(args.random_output_len, "--random-output-len"),
                               seed=args.seed, tokenize=tokenize)
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path FILE.jsonl")
        return jsonl_requests(args.dataset_path, args.num_prompts, args.jsonl_max_tokens, tokenize)
    return chat_requests(args.num_prompts, seed=args.seed, tokenize=tokenize)


WARMUP_MAX_TOKENS = 16  # enough to run prefill and a few decode steps; a warm-up need not be long


def build_warmup_requests(args: BenchConfig, requests: list[BenchRequest]) -> list[BenchRequest]:
    """Short requests shaped like the run's. Random prompts are fresh ones, so the measured requests get no
    prefix-cache hit from the warm-up (vLLM's tool reuses the first prompt)."""
    n = max(0, args.num_warmup)
    if args.dataset == "random" and n:
        fresh = random_requests(n, parse_len_range(args.random_input_len, "--random-input-len"), (1, 1),
                                seed=args.seed + 1_000_003)
    else:
        fresh = [requests[i % len(requests)] for i in range(n)]
    return [dataclasses.replace(r, max_tokens=min(r.max_tokens, WARMUP_MAX_TOKENS)) for r in fresh]


def request_body(req: BenchRequest, model: str, args: BenchConfig) -> tuple[str, dict]:
    """The endpoint path and JSON body for one request."""
    body: dict = {"model": model, "max_tokens": req.max_tokens, "temperature": args.temperature, "stream": True,
                  # usage in the last chunk gives the true token counts (a chunk may carry several tokens).
                  "stream_options": {"include_usage": True}}
    if args.ignore_eos:
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
                       args: BenchConfig, timeout: httpx.Timeout) -> RequestTimeline:
    """Send one streaming request and time every content chunk. Never raises for server or network errors."""
    path, body = request_body(req, model, args)
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


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        r = await client.get("/v1/models", timeout=10.0)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:
        raise RuntimeError(f"--model not given and GET {base_url}/v1/models failed ({type(e).__name__}: {e}); "
                           f"check the server is up at --base-url, or pass --model") from None


async def run_bench_serve_async(args: BenchConfig) -> dict:
    """The benchmark itself; `run_bench_serve` wraps it for synchronous callers."""
    base_url = normalize_base_url(args.base_url)
    check_rate(args.request_rate, args.burstiness)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency}: must be >= 1 (or omit it for no cap)")
    percentiles = parse_percentiles(args.percentiles)
    slo = parse_slo(args.slo)
    requests = build_requests(args)
    offsets_s = arrival_offsets_s(len(requests), args.request_rate, args.burstiness, args.seed)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # No pool limit below the concurrency cap: a request queued for a connection would have its wait
    # counted as TTFT.
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    timeout = httpx.Timeout(connect=30.0, read=args.request_timeout_s, write=30.0, pool=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await resolve_model(client, base_url)
        for w, warm_req in enumerate(build_warmup_requests(args, requests)):
            warm = await send_request(client, -1 - w, warm_req, model, args, timeout)
            if not warm.success:
                raise RuntimeError(f"warm-up request to {base_url} failed: {warm.error}; check --base-url, "
                                   f"--model and the server log (or pass --num-warmup 0 to skip the check)")

        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(i: int, req: BenchRequest) -> RequestTimeline:
            if sem is None:
                return await send_request(client, i, req, model, args, timeout)
            async with sem:
                return await send_request(client, i, req, model, args, timeout)

        progress = None if args.no_progress else _progress()
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
    result = {
        "kind": "bench_serve",
        "started_at": started_at,
        "base_url": base_url,
        "model": model,
        "endpoint": endpoints[0] if len(endpoints) == 1 else "mixed",
        "dataset": args.dataset,
        "dataset_path": args.dataset_path,
        "num_prompts": len(requests),
        # JSON has no infinity; "inf" keeps the file readable by every parser.
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "ignore_eos": bool(args.ignore_eos),
        "percentiles": list(percentiles),
        **metrics,
        "notes": _notes(timelines, args),
        "per_request": per_request_records(timelines),
    }
    return result


def _notes(timelines: Sequence[RequestTimeline], args: BenchConfig) -> list[str]:
    notes = []
    ok = [t for t in timelines if t.success and t.chunk_times_s]
    asked = sum(t.requested_output_tokens or 0 for t in ok)
    got = sum(t.num_output_tokens for t in ok)
    if asked and got < 0.9 * asked:
        hint = "" if args.ignore_eos else "; pass --ignore-eos to hold output lengths to max_tokens"
        notes.append(f"outputs averaged {got / len(ok):.1f} tokens against {asked / len(ok):.1f} asked "
                     f"(the server stopped early){hint}")
    if ok and all(t.output_tokens is None for t in ok):
        notes.append("the server sent no usage; output tokens are counted as content chunks")
    return notes


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark `config` describes; write `config.out` if given; return the result."""
    result = asyncio.run(run_bench_serve_async(config))
    if config.out:
        out = Path(config.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_bench_table(result: dict, console=None) -> None:
    """The result as a rich table, laid out like vLLM's summary."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"bench serve: {result['model']} @ {result['base_url']} ({result['endpoint']})")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v, digits=2):
        return "-" if v is None else (f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}")

    rate = result["request_rate"]
    table.add_row("request rate (req/s) / burstiness", f"{rate} / {result['burstiness']}")
    table.add_row("max concurrency", fmt(result["max_concurrency"]))
    table.add_row("successful / failed requests", f"{result['completed']} / {result['failed']}")
    table.add_row("benchmark duration (s)", fmt(result["duration_s"]))
    table.add_row("total input / output tokens", f"{result['total_input_tokens']:,} / "
                                                  f"{result['total_output_tokens']:,}")
    table.add_row("request throughput (req/s)", fmt(result["request_throughput_per_s"]))
    if result.get("request_goodput_per_s") is not None:
        slo = ",".join(f"{k}={v:g}" for k, v in result["slo"].items())
        table.add_row(f"request goodput (req/s) [{slo}]", fmt(result["request_goodput_per_s"]))
    table.add_row("output token throughput (tok/s)", fmt(result["output_throughput_tok_s"]))
    table.add_row("total token throughput (tok/s)", fmt(result["total_token_throughput_tok_s"]))
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        table.add_section()
        table.add_row(f"mean / median / std {label} (ms)",
                      " / ".join(fmt(result[f"{s}_{name}_ms"]) for s in ("mean", "median", "std")))
        for p in result["percentiles"]:
            label_p = f"{p:g}".replace(".", "_")
            table.add_row(f"p{p:g} {label} (ms)", fmt(result[f"p{label_p}_{name}_ms"]))
    console.print(table)
    for f in result["failed_requests"][:10]:
        console.print(f"[red]failed request {f['index']}[/red]: {f['error']}")
    if result["failed"] > 10:
        console.print(f"... and {result['failed'] - 10} more failures (all listed in the JSON)")
    for note in result["notes"]:
        console.print(f"[yellow]note[/yellow]: {note}")
