"""`pernode bench serve` against a real `pernode serve` at several request rates, one table at the end.

Starts the server as a subprocess on a free loopback port, waits for /health, runs the load generator at each
rate, stops the server with SIGTERM. Usage:

    .venv/bin/python benchmarks/serve_rates.py --rates 0.5,1,2 --num-prompts 40 [--model smollm2-135m]
"""
import argparse
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
from rich.console import Console
from rich.table import Table

from pernode.measure.bench.bench_serve import run_bench
from pernode.measure.bench.config import BenchConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rates", default="0.5,1,2", help="requests per second, comma separated")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", default="128:256")
    p.add_argument("--output-len", default="64:128")
    p.add_argument("--server-args", default="", help="extra flags for pernode serve")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pernode.cli", "serve", "--model", args.model, "--port",
                               str(port), *args.server_args.split()], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise SystemExit("server did not become healthy in 300 s")
        for rate in [float(r) for r in args.rates.split(",")]:
            config = BenchConfig(base_url=base, num_prompts=args.num_prompts, request_rate=rate,
                                 random_input_len=args.input_len, random_output_len=args.output_len,
                                 ignore_eos=True, seed=0, no_progress=True)
            results.append(run_bench(config).to_dict())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    t = Table(title=f"pernode serve, {args.model}: {args.num_prompts} requests per rate, input {args.input_len}, "
                    f"output {args.output_len} tokens (Poisson arrivals)")
    for col in ("rate req/s", "done", "failed", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                "TPOT p99 ms", "E2E p50 ms"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(f"{r['request_rate']:g}", str(r["completed"]), str(r["failed"]),
                  f"{r['request_throughput_per_s']:.2f}", f"{r['output_throughput_tok_s']:.1f}",
                  f"{r['median_ttft_ms']:.0f}", f"{r['p99_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}",
                  f"{r['p99_tpot_ms']:.1f}", f"{r['median_e2el_ms']:.0f}")
    Console().print(t)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
