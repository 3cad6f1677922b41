"""What a request's hops between threads cost inside a serving process while the engine steps on the same core:
the handler's `asyncio.to_thread` round trip (parsing, tokenizing), tokenizing through it, and an engine step's
outputs reaching the event loop (`call_soon_threadsafe`), each with the engine idle and with it stepping N
streams on a thread of its own (the GIL and the core shared, as in `pernode serve` and a Ray replica).

    OMP_NUM_THREADS=1 PYTHONPATH=src taskset -c 0 python benchmarks/handler_hops.py [--streams 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams

TEXT = " ".join(["the quick brown fox jumps over a lazy dog"] * 9)  # about 80 tokens


def _ms(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] * 1e3 if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hops", type=int, default=40, help="hops timed per arm and round")
    args = ap.parse_args(argv)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", num_threads=1, kv_cache_bytes=256 * 2**20))
    tokenizer = engine.tokenizer
    stop, busy = threading.Event(), threading.Event()
    deliveries: list[float] = []
    state: dict = {}

    def engine_loop() -> None:  # steps only while `busy`, refilling its streams as they finish
        n = 0
        while not stop.is_set():
            if not busy.is_set():
                time.sleep(0.001)
                continue
            if not engine.has_unfinished_requests():
                params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.0)
                for i in range(args.streams):
                    engine.add_request(f"bg{n}-{i}", list(range(100, 180)), params)
                n += 1
            engine.step()
            loop = state.get("loop")
            if loop is not None:
                sent = time.perf_counter()
                loop.call_soon_threadsafe(lambda sent=sent: deliveries.append(time.perf_counter() - sent))

    async def arm(label: str) -> None:
        hop, encode = [], []
        deliveries.clear()
        for _ in range(args.hops):
            t = time.perf_counter()
            await asyncio.to_thread(lambda: None)
            hop.append(time.perf_counter() - t)
            t = time.perf_counter()
            await asyncio.to_thread(tokenizer.encode, TEXT)
            encode.append(time.perf_counter() - t)
            await asyncio.sleep(0.013)  # out of phase with the steps
        d = list(deliveries)
        print(f"{label}: to_thread round trip p50 {_ms(hop, .5):.2f} / p90 {_ms(hop, .9):.2f} ms; tokenizing through "
              f"it p50 {_ms(encode, .5):.2f} / p90 {_ms(encode, .9):.2f} ms; step outputs to the event loop p50 "
              f"{_ms(d, .5):.2f} / p90 {_ms(d, .9):.2f} ms over {len(d)} steps", flush=True)

    async def run() -> None:
        state["loop"] = asyncio.get_running_loop()
        t = time.thread_time()
        for _ in range(20):
            tokenizer.encode(TEXT)
        print(f"tokenizing {len(tokenizer.encode(TEXT))} tokens: {(time.thread_time() - t) / 20 * 1e3:.2f} ms CPU")
        for r in range(args.rounds):
            busy.clear()
            await asyncio.sleep(0.3)
            await arm(f"round {r}, engine idle")
            busy.set()
            await asyncio.sleep(0.5)
            await arm(f"round {r}, engine stepping {args.streams} streams")
        busy.clear()
        state.pop("loop")
        stop.set()
        await asyncio.to_thread(thread.join, 5)  # before the loop closes: the engine thread posts to it

    thread = threading.Thread(target=engine_loop, daemon=True)
    thread.start()
    load_before = os.getloadavg()[0]
    asyncio.run(run())
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
