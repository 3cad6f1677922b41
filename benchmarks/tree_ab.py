"""Old code against new, interleaved: the same measurement run alternately under two source trees, so load that
drifts over the run hits both alike. Each round runs one process per tree (order alternating) and the verdict is
the median of the per-round ratios. Usage (a baseline tree from any commit, e.g. `git archive HEAD~1 | tar -x -C
/tmp/base`):

    python benchmarks/tree_ab.py --baseline /tmp/base/src --rounds 6 decode-step
    python benchmarks/tree_ab.py --baseline /tmp/base/src --rounds 6 gemv-rows
    python benchmarks/tree_ab.py --baseline /tmp/base/src --rounds 6 offline

decode-step: the median CPU time (and wall time) of a batch-1 (or `--batch N`) greedy decode step of the default
model (1 thread, 128-token prompts, or `--prompt-len N`). On a busy box the CPU time is the figure to read: the wall time adds the waits for a core. gemv-rows: the int4 (Q4_1) GEMVs of one decoder pass of the default model's shapes (30 layers, weights streamed
from memory) at 1, 2, 4, 5, 8 and 16 rows with int8 activations, 1 thread, as multiples of the 1-row time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
GEMV_ROWS = (1, 2, 4, 5, 8, 16)
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # SmolLM2-135M: qkv, o, gate_up, down


def decode_step(steps: int, batch: int = 1, prompt_len: int = 128) -> dict:
    import torch
    sys.path.insert(0, str(HERE.parent))
    from step_overhead import start_batch
    from pernode.config import EngineConfig
    from pernode.serve.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model="smollm2-135m", num_threads=1, kv_cache_bytes=1024 * 2**20))  # holds 32 requests of 384 + 100 tokens
    start_batch(engine, batch, prompt_len, steps + 40, "ab")
    for _ in range(10):
        engine.step()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    # CPU time of the (only) thread: what the step costs, without the time it waited for a core on a busy box
    return {"step_ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu),
            "threads": torch.get_num_threads()}


def gemv_rows(repeats: int, layers: int = 30) -> dict:
    """One decoder pass of GEMVs (the four shapes x `layers` distinct layers, ~80 MB of Q4_1 weights: more than
    the L3, so the weights stream from memory as in a real decode step) at each row count, row counts interleaved,
    best of `repeats`."""
    import torch
    torch.set_num_threads(1)
    from pernode.quant_format import QuantScheme
    from pernode.serve.kernels.quant_linear import QuantLinear
    calls = []
    for _ in range(layers):
        for n, k in SHAPES:
            layer = QuantLinear(k, n, QuantScheme(4, 32, symmetric=False, float_min=True))
            # scales and mins that fp16 holds exactly, as a GGUF's are
            layer.set_quantized(torch.randint(-8, 8, (n, k), dtype=torch.int8),
                                (torch.rand(n, k // 32) / 10).half().float(), -torch.rand(n, k // 32).half().float())
            calls.append((layer._op, (*layer._op_args[:5], 1, True), k))  # the operands the layer's GEMV gets
    xs = {(r, k): torch.randn(r, k) for r in GEMV_ROWS for _, k in SHAPES}
    best = {r: float("inf") for r in GEMV_ROWS}
    for i in range(repeats):
        for r in (GEMV_ROWS if i % 2 else GEMV_ROWS[::-1]):
            t0 = time.thread_time()  # CPU time: a busy box's waits for a core do not count
            for op, args, k in calls:
                op(xs[r, k], *args)
            best[r] = min(best[r], time.thread_time() - t0)
    out = {str(r): best[r] / best[1] for r in GEMV_ROWS}
    out["1-row ms"] = 1e3 * best[1]
    return {"decoder pass": out}


def offline(num_prompts: int = 48) -> dict:
    from pernode.config import EngineConfig
    from pernode.measure.bench.bench_offline import run_bench_offline
    from pernode.measure.bench.config import OfflineBenchConfig
    from pernode.serve.engine.llm_engine import LLMEngine
    from pernode.serve.llm import LLM
    from pernode.serve.models.registry import resolve_model
    engine = LLMEngine(EngineConfig(model="smollm2-135m"))
    (result,) = run_bench_offline(LLM.from_engine(engine), resolve_model("smollm2-135m"),
                                  OfflineBenchConfig(num_prompts=num_prompts, peers=()))
    return {"tok_s": result.output_tokens_per_s}


def run_worker(src: str, what: str, batch: int, prompt_len: int) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    if what != "offline":  # one thread: the kernels' own time, not the thread team's
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(HERE), "--worker", what, "--batch", str(batch), "--prompt-len", str(prompt_len)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("decode-step", "gemv-rows", "offline"))
    p.add_argument("--baseline", help="the old tree's src folder")
    p.add_argument("--candidate", default=str(HERE.parents[1] / "src"), help="the new tree's src folder")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, default=1, help="decode-step: running requests in the step")
    p.add_argument("--prompt-len", type=int, default=128, help="decode-step: prompt tokens per request")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        work = {"decode-step": lambda: decode_step(60, args.batch, args.prompt_len), "gemv-rows": lambda: gemv_rows(9),
                "offline": offline}[args.what]
        print(json.dumps(work()))
        return 0
    if not args.baseline:
        p.error("--baseline: the old tree's src folder is required")
    trees = {"old": args.baseline, "new": args.candidate}
    results: dict[str, list] = {"old": [], "new": []}
    for i in range(args.rounds):
        for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
            results[name].append(run_worker(trees[name], args.what, args.batch, args.prompt_len))
        load = os.getloadavg()[0]
        if args.what == "decode-step":
            o, n = results["old"][-1], results["new"][-1]
            print(f"round {i + 1}: wall old {o['step_ms']:.2f} ms, new {n['step_ms']:.2f} ms; CPU old "
                  f"{o['cpu_ms']:.2f} ms, new {n['cpu_ms']:.2f} ms, new/old {n['cpu_ms'] / o['cpu_ms']:.3f} "
                  f"(load {load:.2f})", flush=True)
        elif args.what == "offline":
            o, n = results["old"][-1]["tok_s"], results["new"][-1]["tok_s"]
            print(f"round {i + 1}: output tok/s old {o:.1f}, new {n:.1f}, new/old {n / o:.3f} (load {load:.2f})",
                  flush=True)
        else:
            print(f"round {i + 1} done (load {load:.2f})", flush=True)
    if args.what == "decode-step":
        for key, label in (("cpu_ms", "CPU time"), ("step_ms", "wall time")):
            ratios = [n[key] / o[key] for o, n in zip(results["old"], results["new"])]
            print(f"batch-{args.batch} decode step {label}, new/old median {statistics.median(ratios):.3f} over {len(ratios)} "
                  f"rounds (old median {statistics.median(r[key] for r in results['old']):.2f} ms, new "
                  f"{statistics.median(r[key] for r in results['new']):.2f} ms)")
    elif args.what == "offline":
        ratios = [n["tok_s"] / o["tok_s"] for o, n in zip(results["old"], results["new"])]
        print(f"offline output tok/s, new/old median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}; old median "
              f"{statistics.median(r['tok_s'] for r in results['old']):.1f}, new "
              f"{statistics.median(r['tok_s'] for r in results['new']):.1f})")
    else:
        for name in ("old", "new"):
            for shape in results[name][0]:
                cells = {r: statistics.median(res[shape][r] for res in results[name])
                         for r in results[name][0][shape]}
                print(f"{name} {shape}: " + ", ".join(f"{r} rows {v:.2f}x" if r != "1-row ms" else f"1 row {v:.2f} ms"
                                                      for r, v in cells.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
