"""What the serving path adds to the engine's own times: HTTP, tokenizing, detokenizing and streaming, measured
against a real `pernode serve` on loopback with the same engine flags, one request at a time (no queueing).

Per request: TTFT over HTTP minus the profile's prefill time for that prompt length (the server's own token count).
Per token: TPOT over HTTP minus the profile's decode step at batch 1. Medians, floored at zero. The planner's step
time model adds them (price/step_time.py): the request's share before the engine sees it, the token's share to
every decode step, since detokenizing and streaming run on the engine's own core.
"""
from __future__ import annotations

import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import httpx
import numpy as np

from pernode.measure.bench.bench_serve import run_bench
from pernode.measure.bench.config import BenchConfig

log = logging.getLogger("pernode.profile")

DEFAULT_REQUESTS = 12
DEFAULT_INPUT_LEN = "32:256"
DEFAULT_OUTPUT_LEN = "32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefill_s(profile: Mapping[str, Any], prompt_len: float) -> float:
    rows = sorted(profile["prefill"], key=lambda r: r["prompt_len"])
    rate = np.interp(prompt_len, [r["prompt_len"] for r in rows], [r["prefill_tokens_per_s"] for r in rows])
    return float(prompt_len / rate)


def decode_step_at_batch_1_s(profile: Mapping[str, Any]) -> float:
    """The batch-1 decode step (interpolated from the smallest batches measured; mean over contexts)."""
    by_ctx: dict = {}
    for r in profile["decode"]:
        by_ctx.setdefault(r.get("context_len"), []).append(r)
    values = []
    for rows in by_ctx.values():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        values.append(float(np.interp(1, [r["batch_size"] for r in rows], [r["step_s"] for r in rows])))
    return float(np.mean(values))


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pernode serve exited with status {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"pernode serve did not answer {url}/v1/models within {timeout_s:.0f} s")


def measure_serving_path(profile: Mapping[str, Any], engine_flags: Sequence[str], tokenizer: str | None = None,
                         num_requests: int = DEFAULT_REQUESTS, input_len: str = DEFAULT_INPUT_LEN,
                         output_len: str = DEFAULT_OUTPUT_LEN, timeout_s: float = 600.0) -> dict:
    """Start `pernode serve ENGINE_FLAGS` on a free loopback port, send `num_requests` streamed requests one at a
    time, stop the server, and return the profile's serving_path section."""
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests}: allowed >= 1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pernode.cli", "serve", *engine_flags, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as server_log:
        proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            _wait_ready(url, proc, timeout_s)
            print(f"serving path: pernode serve up on {url}; {num_requests} requests one at a time", flush=True)
            result = run_bench(BenchConfig(base_url=url, random_input_len=input_len, random_output_len=output_len,
                                           num_prompts=num_requests, max_concurrency=1, ignore_eos=True,
                                           tokenizer=tokenizer, num_warmup=2, no_progress=True))
        except Exception:
            server_log.seek(0)
            log.error("pernode serve output:\n%s", server_log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    rows = [r for r in result.per_request if r.success]
    if not rows:
        raise RuntimeError("serving path: no request succeeded against pernode serve")
    step_1 = decode_step_at_batch_1_s(profile)
    request_extra = [r.ttft_s - prefill_s(profile, r.prompt_tokens) for r in rows]
    token_extra = [r.tpot_s - step_1 for r in rows if r.tpot_s is not None]
    return {
        "request_s": max(0.0, statistics.median(request_extra)),
        "token_s": max(0.0, statistics.median(token_extra)) if token_extra else 0.0,
        "requests": len(rows),
        "ttft_p50_s": statistics.median(r.ttft_s for r in rows),
        "tpot_p50_s": statistics.median(token_extra) + step_1 if token_extra else None,
        "input_len": input_len, "output_len": output_len,
        "method": "HTTP TTFT minus the profile's prefill time for the prompt, HTTP TPOT minus the batch-1 decode "
                  "step; medians over requests sent one at a time to `pernode serve` on loopback",
    }
