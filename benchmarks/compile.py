"""--compile against the eager forward, in one run: compile (warm-up) time, the same greedy tokens for the README
prompts, and decode-step and prefill times side by side (alternating eager and compiled, so both see the same
machine load, which is printed). Usage:

    .venv/bin/python benchmarks/compile.py [--model smollm2-135m] [--batch-sizes 1,8,32] [--context 256] [--dtype ...]
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from pernode import LLM, SamplingParams
from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine

README_PROMPTS = ["The capital of France is", "def fib(n):"]


def prefill_s(llm: LLM, num_tokens: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, llm.engine.model_config.vocab_size - 100, (num_tokens,), generator=g).tolist()
    t0 = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="alternating eager/compiled rounds per measurement")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache of each engine (default %(default)s)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # two engines in one process: a KV cache just big enough for the largest batch keeps the pair small
    common = dict(model=args.model, dtype=args.dtype, num_threads=args.threads, max_model_len=2048,
                  kv_cache_bytes=args.kv_cache_mib * 2**20)
    eager = LLM.from_engine(LLMEngine(EngineConfig(**common)))
    t0 = time.perf_counter()
    compiled = LLM.from_engine(LLMEngine(EngineConfig(**common, compile=True)))
    start_s = time.perf_counter() - t0
    warm_s = compiled.engine.compile_time_s
    print(f"compiled engine: start {start_s:.1f} s, of which compile warm-up {warm_s:.1f} s "
          f"(cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')}), load {os.getloadavg()[0]:.1f}", flush=True)

    params = SamplingParams(temperature=0.0, max_tokens=32)
    want = [o.outputs[0].token_ids for o in eager.generate(README_PROMPTS, params)]
    got = [o.outputs[0].token_ids for o in compiled.generate(README_PROMPTS, params)]
    same = want == got
    first_diff = None
    if not same:
        first_diff = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None) for w, g in zip(want, got)]
    print(f"greedy tokens of the README prompts identical: {same}" + (f" (first differing index {first_diff})"
                                                                       if not same else ""), flush=True)

    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        times = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for name, llm in (("eager", eager), ("compiled", compiled)):
                steps = llm.engine.time_decode_steps(b, args.context, args.steps, seed=r)
                if steps is None:
                    raise SystemExit(f"batch {b} at context {args.context} does not fit the KV cache")
                times[name].append(statistics.median(steps))
        rows.append({"what": f"decode batch {b}, context {args.context}", "eager_ms": 1e3 * min(times["eager"]),
                     "compiled_ms": 1e3 * min(times["compiled"]), "load": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    times = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for name, llm in (("eager", eager), ("compiled", compiled)):
            times[name].append(prefill_s(llm, args.prefill_tokens, r))
    rows.append({"what": f"prefill {args.prefill_tokens} tokens", "eager_ms": 1e3 * min(times["eager"]),
                 "compiled_ms": 1e3 * min(times["compiled"]), "load": os.getloadavg()[0]})

    t = Table(title=f"--compile vs eager, {args.model} {eager.engine.dtype}, {torch.get_num_threads()} threads; "
                    f"compile warm-up {warm_s:.1f} s; README greedy tokens identical: {same}")
    for col in ("step", "eager ms", "compiled ms", "eager / compiled", "load (1 min)"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["what"], f"{r['eager_ms']:.2f}", f"{r['compiled_ms']:.2f}",
                  f"{r['eager_ms'] / r['compiled_ms']:.2f}x", f"{r['load']:.1f}")
    Console(width=160).print(t)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"compile_warm_up_s": warm_s, "start_s": start_s, "greedy_identical": same, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
