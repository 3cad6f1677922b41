"""`pernode bench serve` end to end against a tiny OpenAI-shaped streaming server with known delays.

The server waits 50 ms before the first chunk and 10 ms between its 5 chunks, so TTFT ~ 50 ms, ITL ~ TPOT ~ 10 ms,
E2E ~ 90 ms; a prompt containing FAIL gets HTTP 500. Bounds are loose (the CI machine is shared).
"""
import argparse
import dataclasses
import asyncio
import io
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from rich.console import Console

from pernode.cli.bench import add_serve_arguments as add_arguments, bench_config_from_args
from pernode.measure.bench.bench_result import BenchResult
from pernode.measure.bench.bench_serve import print_bench_table, run_bench

FIRST_CHUNK_S, BETWEEN_CHUNKS_S, NUM_CHUNKS, PROMPT_TOKENS = 0.05, 0.01, 5, 7


def make_app(received: list) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        await asyncio.sleep(FIRST_CHUNK_S)
        for i in range(NUM_CHUNKS):
            if i:
                await asyncio.sleep(BETWEEN_CHUNKS_S)
            choice = ({"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"})
            yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"
        # The chat endpoint plays a server that sends no usage, so tokens are counted as chunks.
        if not chat and body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NUM_CHUNKS,
                     "total_tokens": PROMPT_TOKENS + NUM_CHUNKS}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        received.append(body)
        text = json.dumps(body.get("messages")) if chat else body["prompt"]
        if "FAIL" in text:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    received: list = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(received), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "test server did not start"
    yield f"http://127.0.0.1:{port}", received
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def parse(argv):
    return bench_config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_completions_timings_and_failure(server, tmp_path):
    base_url, received = server
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"hello number {i}", "max_tokens": 5} for i in range(5)] + [{"prompt": "FAIL please"}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "result.json"
    received.clear()
    run = run_bench(parse([
        "--base-url", base_url + "/v1", "--dataset", "jsonl", "--dataset-path", str(prompts), "--num-prompts", "6",
        "--max-concurrency", "3", "--ignore-eos", "--slo", "ttft_ms=1000,tpot_ms=200", "--out", str(out),
        "--no-progress"]))
    result = run.to_dict()

    assert result["model"] == "fake-model"  # from GET /v1/models
    assert result["endpoint"] == "completions"
    assert (result["num_requests"], result["completed"], result["failed"]) == (6, 5, 1)
    assert result["failed_requests"][0]["index"] == 5
    assert "HTTP 500" in result["failed_requests"][0]["error"]
    assert "injected failure" in result["failed_requests"][0]["error"]
    # Known delays: TTFT 50 ms, ITL and TPOT 10 ms, E2E 90 ms. Sleeps only overshoot, so the lower bounds are
    # tight; the upper bounds leave room for a loaded 2-core machine.
    assert 45 <= result["mean_ttft_ms"] <= 300
    assert 5 <= result["mean_itl_ms"] <= 150
    assert 5 <= result["mean_tpot_ms"] <= 150
    assert 85 <= result["mean_e2el_ms"] <= 600
    for row in result["per_request"][:5]:
        assert 0.045 <= row["ttft_s"] <= 0.3 and len(row["itl_s"]) == NUM_CHUNKS - 1
        # the definitions tie together whatever the load: E2E = TTFT + sum(ITL), TPOT = sum(ITL) / (n - 1)
        assert abs(row["e2e_s"] - row["ttft_s"] - sum(row["itl_s"])) < 1e-6
    # Tokens from the server's usage; throughputs over the benchmark's duration.
    assert result["total_output_tokens"] == 5 * NUM_CHUNKS
    assert result["total_input_tokens"] == 5 * PROMPT_TOKENS
    assert result["output_throughput_tok_s"] == pytest.approx(25 / result["duration_s"])
    assert result["good_requests"] == 5
    # What was sent: 1 warm-up + 6 requests, streaming with usage, max_tokens and ignore_eos passed through.
    assert len(received) == 7
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in received)
    assert all(b["ignore_eos"] is True and b["model"] == "fake-model" for b in received)
    failing = [b for b in received if b["prompt"] == "FAIL please"]  # arrival order at the server varies
    assert len(failing) == 1 and failing[0]["max_tokens"] == 256  # the line gave none: --jsonl-max-tokens
    # The JSON file holds the same result, failures listed; the table prints.
    saved = json.loads(out.read_text())
    assert saved == result and saved["request_rate"] == "inf"
    assert BenchResult.from_dict(saved) == run  # the file reads back as the typed result
    assert run.metrics.failed == 1 and run.metrics.ttft.percentile_ms(99) == result["p99_ttft_ms"]
    console = Console(file=io.StringIO(), width=120)
    print_bench_table(run, console)
    table = console.file.getvalue()
    assert "TTFT" in table and "failed request 5" in table


def test_chat_without_usage_counts_chunks(server):
    base_url, received = server
    received.clear()
    result = run_bench(parse([
        "--base-url", base_url, "--model", "fake-model", "--dataset", "chat", "--num-prompts", "4",
        "--request-rate", "40", "--burstiness", "0.5", "--seed", "3", "--num-warmup", "0", "--no-progress"])).to_dict()
    assert result["endpoint"] == "chat" and result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == 4 * NUM_CHUNKS  # no usage: one token per content chunk
    assert any("no usage" in n for n in result["notes"])
    assert all("messages" in b and "ignore_eos" not in b for b in received)
    assert 45 <= result["mean_ttft_ms"] <= 80


def test_unreachable_server_fails_are_counted():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse(["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "3",
                  "--random-input-len", "8", "--random-output-len", "4", "--no-progress"])
    with pytest.raises(RuntimeError, match=f"warm-up request to http://127.0.0.1:{port} failed"):
        run_bench(args)
    result = run_bench(dataclasses.replace(args, num_warmup=0)).to_dict()
    assert (result["completed"], result["failed"]) == (0, 3)
    assert [f["index"] for f in result["failed_requests"]] == [0, 1, 2]
    assert all("ConnectError" in f["error"] for f in result["failed_requests"])
    assert result["mean_ttft_ms"] is None


def test_bad_settings_name_the_setting(server):
    base_url, _ = server
    with pytest.raises(ValueError, match="max_concurrency=0"):
        run_bench(parse(["--base-url", base_url, "--max-concurrency", "0", "--no-progress"]))
    with pytest.raises(ValueError, match="base_url='localhost:8000'"):
        run_bench(parse(["--base-url", "localhost:8000", "--no-progress"]))
    with pytest.raises(ValueError, match="dataset_path"):
        run_bench(parse(["--base-url", base_url, "--dataset", "jsonl", "--no-progress"]))
