"""`pernode bench serve` against `pernode serve` and against llama.cpp's own server with parallel slots, on the same
GGUF, the same workload and the same client, at several concurrencies, in one run.

llama-server is built once from the llama-cpp-python sdist (benchmarks/llama_cpp_build.py, cached in
~/.cache/pernode/llama.cpp). Both servers stay up for the whole run; at each concurrency the two are measured back to
back (pernode first), so both see the same machine load, which is printed beside each pair. Workload: random word
prompts of U[32, 512] tokens, outputs U[16, 256] tokens with ignore_eos, greedy, streamed, `--prompts-per-slot`
requests per concurrent slot (at least 4). Optionally `llama-bench` pp512/tg128 and pernode's own prefill rate.
Usage:

    .venv/bin/python benchmarks/llama_server.py [--concurrency 1,8,32] [--threads 2] [--pernode-args "--dtype bfloat16"]
"""
import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_build import build, tool_path  # noqa: E402

from pernode.measure.bench.bench_serve import run_bench  # noqa: E402
from pernode.measure.bench.config import BenchConfig  # noqa: E402
from pernode.serve.models.registry import resolve_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before becoming healthy ({base})")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"server at {base} did not become healthy in {timeout_s:.0f} s")


def load_averages() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def start_pernode(model: str, threads: int, extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pernode.cli", "serve", "--model", model, "--port", str(port),
           "--threads", str(threads), "--max-num-seqs", "64", *shlex.split(extra)]
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def start_llama_server(gguf: str, threads: int, slots: int, ctx_per_slot: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(tool_path("llama-server")), "-m", gguf, "--port", str(port), "--host", "127.0.0.1",
           "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
           "-cb", "--no-webui"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def bench(base: str, concurrency: int, num_prompts: int, args) -> dict:
    config = BenchConfig(base_url=base, num_prompts=num_prompts, max_concurrency=concurrency,
                         random_input_len=args.input_len, random_output_len=args.output_len, ignore_eos=True,
                         seed=args.seed, tokenizer=args.gguf, no_progress=True, num_warmup=1)
    load = load_averages()
    result = run_bench(config).to_dict()
    result["load_before"], result["load_after"] = load, load_averages()
    return result


def llama_bench(gguf: str, threads: int) -> dict:
    cmd = [str(tool_path("llama-bench")), "-m", gguf, "-t", str(threads), "-p", "512", "-n", "128", "-o", "json"]
    print("$", " ".join(cmd), flush=True)
    load = load_averages()
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out = {"load": load}
    for r in rows:
        key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        out[key] = r["avg_ts"]
    return out


def pernode_prefill(model: str, threads: int, extra: str, prompt_len: int = 512) -> dict:
    """pernode's own prefill of one `prompt_len`-token prompt, from `pernode profile`, to set beside llama-bench's pp512."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prefill.json"
        cmd = [sys.executable, "-m", "pernode.cli", "profile", "--model", model, "--threads", str(threads),
               "--batch-sizes", "1", "--prompt-lens", f"128,{prompt_len}", "--out", str(out), *shlex.split(extra)]
        print("$", " ".join(cmd), flush=True)
        load = load_averages()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        # A shorter prompt first: the first prefill of a process also pays one-time costs the second does not.
        row = next(r for r in json.loads(out.read_text())["prefill"] if r["prompt_len"] == prompt_len)
    return {"load": load, f"pp{prompt_len}": row["prefill_tokens_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="pernode's model name or a .gguf (the same file serves both)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompts-per-slot", type=float, default=2.0)
    p.add_argument("--input-len", default="32:512")
    p.add_argument("--output-len", default="16:256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--pernode-args", default="", help="extra flags for pernode serve")
    p.add_argument("--llama-bench", action="store_true", help="also run llama-bench pp512/tg128")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    args.gguf = resolve_model(args.model).path
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    build(jobs=2, version=None)

    servers = [start_pernode(args.model, args.threads, args.pernode_args),
               start_llama_server(args.gguf, args.threads, max(concurrencies), 1024)]
    results: dict = {"pernode": {}, "llama.cpp": {}}
    try:
        for proc, base in servers:
            wait_healthy(base, proc)
        for c in concurrencies:
            n = max(4, round(c * args.prompts_per_slot))
            for name, (_, base) in zip(("pernode", "llama.cpp"), servers):
                print(f"{name} at concurrency {c}: {n} requests (load {load_averages()})", flush=True)
                results[name][c] = bench(base, c, n, args)
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.llama_bench:
        results["llama-bench"] = llama_bench(args.gguf, args.threads)
        results["pernode prefill"] = pernode_prefill(args.model, args.threads, args.pernode_args)

    t = Table(title=f"{Path(args.gguf).name}: input {args.input_len}, output {args.output_len} tokens, ignore_eos, "
                    f"{args.threads} threads each")
    for col in ("concurrency", "server", "requests", "out tok/s", "TTFT p50 ms", "TPOT p50 ms", "E2E p50 ms",
                "pernode / llama.cpp out tok/s", "load 1/5/15 min"):
        t.add_column(col, justify="right")
    for c in concurrencies:
        ours, peer = results["pernode"][c], results["llama.cpp"][c]
        for name, r in (("pernode", ours), ("llama.cpp", peer)):
            ratio = ours["output_throughput_tok_s"] / max(peer["output_throughput_tok_s"], 1e-9)
            t.add_row(str(c), name, str(r["completed"]), f"{r['output_throughput_tok_s']:.1f}",
                      f"{r['median_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}", f"{r['median_e2el_ms']:.0f}",
                      f"{ratio:.2f}x" if name == "pernode" else "", r["load_before"])
    Console(width=200).print(t)
    if "llama-bench" in results:
        print("llama-bench:", json.dumps(results["llama-bench"]))
        ours, peer = results["pernode prefill"]["pp512"], results["llama-bench"]["pp512"]
        print(f"pernode prefill of 512 tokens: {ours:.0f} tok/s, {ours / peer:.2f}x llama-bench pp512 "
              f"(load {results['pernode prefill']['load']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
