"""Abuse benchmark of `pernode serve`: a good request keeps its latency while abusive ones are refused fast.

Starts `pernode serve` on a free loopback port (the tests' tiny random model with `--tiny`, else `--model`) with a
short `--body-read-timeout`, measures a good request's latency when idle (short non-streamed completions,
`max_tokens` 8, `ignore_eos`), then, one kind at a time, keeps `--copies` concurrent clients sending an abusive
request (each waits `--gap-s` between its requests; 0 makes a closed-loop flood) for `--attack-s` seconds, and at
least until `--min-good` good requests were done, while one client in its own process sends good requests in a
loop. For each kind it records every abusive response's status, whether its body is OpenAI's
error shape (`{"error": {"message", "type", "code", ...}}`) and its latency, and the good requests' p50 and p95
during the attack against idle.

The burst above `max_concurrent_requests` runs last, against its own server started with
`--max-concurrent-requests 16`: 64 clients send ordinary requests at once, so the ones beyond the cap must get 429.
Its ordinary requests that got in are not abusive (they are counted as `200`); a good request is counted against
the same cap, so a 429 for it there is the designed answer: it is shown, not counted as a failure.

Exit status 0 when every abusive request (but the burst's admitted ones) got a 4xx in OpenAI's shape and no good
request failed. The load average is printed before and after (the machine may be shared); a ratio above
`--slow-ratio` (2) is marked `SLOW`.

    .venv/bin/python benchmarks/abuse.py --tiny
    .venv/bin/python benchmarks/abuse.py --model smollm2-135m --attack-s 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import free_port, percentile, tiny_model_folder  # noqa: E402  (the soak's helpers)

GOOD = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
BURST_CAP = 16
BURST_CLIENTS = 64


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------------------
# the server


def start_server(model: str, extra: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    """`pernode serve` on a free loopback port, once /health answers 200 (copied from soak.py's main)."""
    port = free_port()
    cmd = [sys.executable, "-m", "pernode.cli", "serve", "--model", model, "--port", str(port),
           "--log-level", "warning", *extra]
    log = open(log_path, "ab")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            stop_server(server)
            raise SystemExit(f"server did not become healthy (log: {log_path})")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


# ---------------------------------------------------------------------------------------------------------------
# requests


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer (connection error, or the client gave up)
    openai_shape: bool
    ms: float
    note: str = ""


def is_openai_error(body: bytes) -> bool:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err["message"]) \
        and isinstance(err.get("type"), str) and "code" in err


async def http_request(client: httpx.AsyncClient, path: str, content, headers: dict[str, str]) -> Answer:
    t = time.perf_counter()
    try:
        r = await client.post(path, content=content, headers=headers)
        body = r.content
        return Answer(r.status_code, is_openai_error(body), (time.perf_counter() - t) * 1000,
                      "" if r.status_code < 300 else body[:160].decode("utf-8", "replace"))
    except httpx.HTTPError as exc:
        return Answer(None, False, (time.perf_counter() - t) * 1000, f"{type(exc).__name__}: {exc}")


async def raw_trickle(host: str, port: int, head: bytes, trickle: bytes, every_s: float, give_up_s: float) -> Answer:
    """Send `head` at once, then `trickle` one byte every `every_s` seconds, until the server answers (or closes)
    or `give_up_s` passes. The answer's status and body are read from the raw HTTP/1.1 response."""
    t = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)

    async def read_answer() -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                return data
            data += chunk
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(rest) < length:
            chunk = await reader.read(65536)
            if not chunk:
                break
            rest += chunk
        return head_part + b"\r\n\r\n" + rest

    answer = asyncio.ensure_future(read_answer())
    try:
        writer.write(head)
        await writer.drain()
        for byte in trickle:
            if answer.done() or time.perf_counter() - t > give_up_s:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.wait({answer}, timeout=every_s)
        remaining = give_up_s - (time.perf_counter() - t)
        if remaining > 0:
            await asyncio.wait({answer}, timeout=remaining)
    except OSError:  # the server closed the connection while we were still writing
        await asyncio.wait({answer}, timeout=5)
    finally:
        ms = (time.perf_counter() - t) * 1000
        if not answer.done():
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)
        writer.close()
    if answer.cancelled() or answer.exception() is not None:
        return Answer(None, False, ms, f"no answer within {give_up_s:g} s (connection held open)")
    data = answer.result()
    if not data:
        return Answer(None, False, ms, "connection closed without an answer")
    status_line, _, _ = data.partition(b"\r\n")
    _, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        return Answer(None, False, ms, f"unreadable answer {data[:80]!r}")
    return Answer(status, is_openai_error(body), ms, "" if status < 300 else body[:160].decode("utf-8", "replace"))


@dataclass
class Kind:
    name: str
    send: object  # async (client, base) -> Answer
    body_bytes: int | None = None
    burst: bool = False  # the max_concurrent_requests case: admitted requests (200) are allowed
    # a request whose head never completes cannot be answered in HTTP: the server closing it is the refusal
    closed_is_refusal: bool = False


def json_post(name: str, body: bytes, path: str = "/v1/completions", headers: dict[str, str] | None = None) -> Kind:
    hdrs = {"Content-Type": "application/json", **(headers or {})}

    async def send(client: httpx.AsyncClient, base: str) -> Answer:
        return await http_request(client, path, body, hdrs)

    return Kind(name, send, len(body))


def chunked_post(name: str, total: int, chunk: int = 65536) -> Kind:
    """A body sent without Content-Length (chunked), so only the server's reading can stop it."""
    piece = b"[" + b"1," * (chunk // 2 - 1) + b"1]"

    async def send(client: httpx.AsyncClient, base: str) -> Answer:
        async def body():
            sent = 0
            while sent < total:
                yield piece
                sent += len(piece)
        return await http_request(client, "/v1/completions", body(), {"Content-Type": "application/json"})

    return Kind(name, send, total)


def slow_body(name: str, declared: int, every_s: float, give_up_s: float) -> Kind:
    async def send(client: httpx.AsyncClient, base: str) -> Answer:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n").encode()
        return await raw_trickle(host, int(port), head, b" " * declared, every_s, give_up_s)

    return Kind(name, send, declared)


def slow_headers(name: str, every_s: float, give_up_s: float) -> Kind:
    async def send(client: httpx.AsyncClient, base: str) -> Answer:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        head = b"POST /v1/completions HTTP/1.1\r\n"
        filler = (f"Host: {host}:{port}\r\n" + "X-Pad: " + "a" * 4000 + "\r\n").encode()
        return await raw_trickle(host, int(port), head, filler, every_s, give_up_s)

    return Kind(name, send, closed_is_refusal=True)


def abusive_kinds(max_model_len: int, args) -> list[Kind]:
    prompt_1mb = compact({"prompt": ["a"] * 250_000, "n": 8})  # 1,000,021 bytes: just under max_body_bytes
    return [
        json_post("prompt list of 250,000 x n=8 (~1 MB JSON)", prompt_1mb),
        json_post("stop_token_ids: 200,000 ids", compact({"prompt": "Hi", "max_tokens": 8,
                                                          "stop_token_ids": [7] * 200_000})),
        json_post("stop string of 100 kB", compact({"prompt": "Hi", "max_tokens": 8, "stop": ["x" * 100_000]})),
        json_post("Content-Type: text/plain (JSON body)", compact(GOOD), headers={"Content-Type": "text/plain"}),
        json_post("Origin: http://evil.example", compact(GOOD), headers={"Origin": "http://evil.example"}),
        json_post("Host: evil.example", compact(GOOD), headers={"Host": "evil.example"}),
        json_post("body of 2 MiB, Content-Length declared", compact({"prompt": "a" * (2 << 20)})),
        chunked_post("body of 2 MiB, chunked (no Content-Length)", 2 << 20),
        slow_body(f"slow body (1 B / {args.trickle_s:g} s, Content-Length 1000)", 1000, args.trickle_s,
                  give_up_s=args.body_read_timeout * 3 + 10),
        json_post("n above max_n (n=9)", compact({**GOOD, "n": 9})),
        json_post("logprobs above max_logprobs (21)", compact({**GOOD, "logprobs": 21})),
        json_post(f"max_tokens {max_model_len + 1} > max_model_len {max_model_len}",
                  compact({**GOOD, "max_tokens": max_model_len + 1})),
        json_post("n=1,000,000,000", compact({**GOOD, "n": 10**9})),
        slow_headers(f"slow headers (1 B / {args.trickle_s:g} s, never complete)", args.trickle_s,
                     give_up_s=args.body_read_timeout * 3 + 10),
    ]


def burst_kind() -> Kind:
    body = compact({"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.8, "ignore_eos": True})
    kind = json_post(f"burst: {BURST_CLIENTS} at once, max_concurrent_requests={BURST_CAP}", body)
    kind.burst = True
    return kind


# ---------------------------------------------------------------------------------------------------------------
# measurement


@dataclass
class Result:
    kind: Kind
    abusive: list[Answer] = field(default_factory=list)
    good_ms: list[float] = field(default_factory=list)
    good_failed: list[str] = field(default_factory=list)
    good_refused: int = 0  # 429 to a good request (the burst case only)


async def good_once(client: httpx.AsyncClient) -> Answer:
    return await http_request(client, "/v1/completions", compact(GOOD), {"Content-Type": "application/json"})


async def idle_latency(base: str, n: int) -> list[float]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for _ in range(3):  # warm-up
            await good_once(client)
        out = []
        for _ in range(n):
            a = await good_once(client)
            if a.status != 200:
                raise SystemExit(f"good request failed while idle: {a.status} {a.note}")
            out.append(a.ms)
        return out


def good_worker(base: str, stop, count, out) -> None:
    """The good client, in its own process (the abusive clients' work must not delay it on our side)."""
    answers = []
    with httpx.Client(base_url=base, timeout=120) as client:
        while not stop.is_set():
            t, wall = time.perf_counter(), time.time()
            try:
                r = client.post("/v1/completions", content=compact(GOOD),
                                headers={"Content-Type": "application/json"})
                note = "" if r.status_code == 200 else r.text[:160]
                a = (wall, r.status_code, (time.perf_counter() - t) * 1000, note)
            except httpx.HTTPError as exc:
                a = (wall, None, (time.perf_counter() - t) * 1000, f"{type(exc).__name__}: {exc}")
            if stop.is_set():
                break  # ended after the attack
            answers.append(a)
            with count.get_lock():
                count.value += 1
    out.put(answers)


async def attack(base: str, kind: Kind, copies: int, gap_s: float, attack_s: float, min_good: int,
                 lead_s: float) -> Result:
    res = Result(kind)
    ctx = multiprocessing.get_context("spawn")
    stop, count, out = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    good = ctx.Process(target=good_worker, args=(base, stop, count, out))
    good.start()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=copies)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as bad_client:
        attacking = asyncio.Event()

        async def abuser() -> None:
            while not attacking.is_set():
                res.abusive.append(await kind.send(bad_client, base))
                if gap_s:
                    await asyncio.sleep(gap_s)

        while count.value < 2 and good.is_alive():  # the good client's process is up (spawn) and warm
            await asyncio.sleep(0.05)
        abusers = [asyncio.create_task(abuser()) for _ in range(copies)]
        await asyncio.sleep(lead_s)  # only good requests sent from here on are counted
        t0, counted = time.time(), count.value
        started = time.perf_counter()
        while time.perf_counter() - started < attack_s or count.value - counted < min_good + 1:
            await asyncio.sleep(0.05)
            if time.perf_counter() - started > 10 * attack_s + 120:
                break
        stop.set()
        attacking.set()
        await asyncio.gather(*abusers)
    answers = out.get(timeout=180)
    good.join(timeout=30)
    for wall, status, ms, note in answers:
        if wall < t0:
            continue
        if status == 200:
            res.good_ms.append(ms)
        elif status == 429 and kind.burst:
            res.good_refused += 1
        else:
            res.good_failed.append(f"{status} {note}")
    return res


def max_model_len_of(base: str) -> int:
    return int(httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["max_model_len"])


# ---------------------------------------------------------------------------------------------------------------
# report


def server_closed(a: Answer) -> bool:
    return a.status is None and a.note == "connection closed without an answer"


def row(res: Result, idle_p50: float, idle_p95: float, slow_ratio: float) -> tuple[list[str], list[str]]:
    """The table row and the problems of one kind."""
    problems = []
    statuses: dict[str, int] = {}
    for a in res.abusive:
        key = str(a.status) if a.status is not None else ("closed" if server_closed(a) else "none")
        statuses[key] = statuses.get(key, 0) + 1
    refused = [a for a in res.abusive if not (res.kind.burst and a.status == 200)]
    bad = [a for a in refused if not (res.kind.closed_is_refusal and server_closed(a))
           and (a.status is None or not 400 <= a.status < 500 or not a.openai_shape)]
    for a in bad[:3]:
        problems.append(f"{res.kind.name}: abusive request answered {a.status} after {a.ms:.0f} ms: {a.note!r}")
    if res.kind.burst and not any(a.status == 429 for a in res.abusive):
        problems.append(f"{res.kind.name}: no request was refused with 429")
    shapes = {a.openai_shape for a in refused}
    shape = "yes" if shapes == {True} else "no" if shapes == {False} else "partly" if shapes else "-"
    bad_p50 = percentile([a.ms for a in refused], 50)
    g50, g95 = percentile(res.good_ms, 50), percentile(res.good_ms, 95)
    r50, r95 = g50 / idle_p50, g95 / idle_p95
    slow = "SLOW " if max(r50, r95) > slow_ratio else ""
    if slow:
        problems.append(f"{res.kind.name}: good requests p50 {g50:.0f} ms / p95 {g95:.0f} ms during the attack, "
                        f"{r50:.1f}x / {r95:.1f}x idle")
    for f in res.good_failed[:3]:
        problems.append(f"{res.kind.name}: a good request failed: {f[:200]}")
    codes = ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items()))
    good = f"{len(res.good_ms)}" + (f" (+{res.good_refused} got 429)" if res.good_refused else "") + \
        (f" ({len(res.good_failed)} FAILED)" if res.good_failed else "")
    size = f"{res.kind.body_bytes:,}" if res.kind.body_bytes else "-"
    return [res.kind.name, size, codes, shape, f"{bad_p50:.0f}", good, f"{g50:.0f} / {g95:.0f}",
            f"{slow}{r50:.2f} / {r95:.2f}"], problems


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="serve the tests' tiny random model (a quick run)")
    p.add_argument("--idle", type=int, default=20, help="good requests timed when idle")
    p.add_argument("--copies", type=int, default=8, help="concurrent clients sending each abusive request")
    p.add_argument("--gap-s", type=float, default=0.25,
                   help="each abusive client waits this long between its requests (0: a closed-loop flood)")
    p.add_argument("--attack-s", type=float, default=5.0, help="seconds each attack lasts (at least)")
    p.add_argument("--min-good", type=int, default=10, help="good requests timed during each attack (at least)")
    p.add_argument("--lead-s", type=float, default=0.3, help="the attack starts this long before the good requests")
    p.add_argument("--body-read-timeout", type=float, default=3.0, help="the server's --body-read-timeout")
    p.add_argument("--trickle-s", type=float, default=0.5, help="a slow client's seconds between bytes")
    p.add_argument("--slow-ratio", type=float, default=2.0, help="good latency above this x idle is marked SLOW")
    p.add_argument("--server-args", default="", help="extra flags for pernode serve")
    p.add_argument("--only", default="", help="run only the kinds whose name contains this text")
    args = p.parse_args(argv)

    model = tiny_model_folder() if args.tiny else args.model
    log_path = os.path.join(tempfile.mkdtemp(prefix="pernode-abuse-"), "server.log")
    common = ["--body-read-timeout", f"{args.body_read_timeout:g}", *args.server_args.split()]
    load_before = os.getloadavg()
    results: list[Result] = []

    server, base = start_server(model, common, log_path)
    try:
        idle = asyncio.run(idle_latency(base, args.idle))
        idle_p50, idle_p95 = percentile(idle, 50), percentile(idle, 95)
        print(f"idle: {len(idle)} good requests, p50 {idle_p50:.1f} ms, p95 {idle_p95:.1f} ms", flush=True)
        for kind in abusive_kinds(max_model_len_of(base), args):
            if args.only and args.only not in kind.name:
                continue
            res = asyncio.run(attack(base, kind, args.copies, args.gap_s, args.attack_s, args.min_good, args.lead_s))
            print(f"  done: {kind.name}: {len(res.abusive)} abusive, {len(res.good_ms)} good, "
                  f"{len(res.good_failed)} good failed", flush=True)
            results.append(res)
        alive = server.poll() is None
    finally:
        stop_server(server)

    if not args.only or args.only in burst_kind().name:
        server, base = start_server(model, [*common, "--max-concurrent-requests", str(BURST_CAP)], log_path)
        try:
            res = asyncio.run(attack(base, burst_kind(), BURST_CLIENTS, args.gap_s, args.attack_s, args.min_good,
                                     args.lead_s))
            print(f"  done: {res.kind.name}: {len(res.abusive)} requests, {len(res.good_ms)} good", flush=True)
            results.append(res)
            alive = alive and server.poll() is None
        finally:
            stop_server(server)
    load_after = os.getloadavg()

    rows, problems = [], []
    for res in results:
        r, pr = row(res, idle_p50, idle_p95, args.slow_ratio)
        rows.append(r)
        problems += pr
    print()
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"model: {'tiny random (tests/tiny_model.py)' if args.tiny else args.model}; server flags: "
          f"{' '.join(common)} (the burst: --max-concurrent-requests {BURST_CAP}); {args.copies} concurrent abusive "
          f"clients per kind, {args.gap_s:g} s between each one's requests, for >= {args.attack_s:g} s "
          f"and >= {args.min_good} good requests")
    print(f"good request: {json.dumps(GOOD)}, one at a time; idle p50 {idle_p50:.1f} ms, p95 {idle_p95:.1f} ms "
          f"({len(idle)} requests)")
    print()
    print_table(["abusive request", "body bytes", "status codes seen", "OpenAI error shape", "abusive p50 ms",
                 "good requests", "good p50 / p95 ms", "ratio to idle p50 / p95"], rows)
    print()
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs; server log: {log_path}")
    if not alive:
        problems.append("the server died during the run")
    for problem in problems:
        print("  problem:", problem)
    refused_ok = not any("abusive request answered" in pr or "no request was refused" in pr for pr in problems)
    good_ok = not any(res.good_failed for res in results)
    print(f"{'PASS' if refused_ok else 'FAIL'}  every abusive request got a 4xx in OpenAI's error shape (a head "
          f"that never completes: its connection closed)")
    print(f"{'PASS' if good_ok and alive else 'FAIL'}  no good request failed")
    return 0 if refused_ok and good_ok and alive else 1


if __name__ == "__main__":
    sys.exit(main())
