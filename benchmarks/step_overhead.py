"""What a decode step costs beyond its GEMMs and attention: where the engine's own time goes.

For each batch size, B requests (prompts of --prompt-len tokens, ignore_eos) are prefilled, then --steps decode
steps are timed by stage with wall clocks around the engine's own parts (schedule, prepare, forward, sample,
update), and once more under torch.profiler to split the forward into GEMMs (aten::mm/addmm, pernode GEMVs),
attention (pernode::paged_attention) and everything else (Python per layer, small ops, KV writes). The overhead
is the step minus GEMMs and attention. Usage:

    .venv/bin/python benchmarks/step_overhead.py [--batch-sizes 1,8,32] [--steps 30] [--model smollm2-135m]
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "pernode::dense_gemv",
            "pernode::woq_linear", "pernode::w8a8_linear", "aten::_weight_int4pack_mm", "aten::_int_mm"}
ATTENTION_OPS = {"pernode::paged_attention", "aten::scaled_dot_product_attention"}
STAGES = ("schedule", "prepare", "forward", "sample", "update")


class StageClock:
    """Wraps a callable so each call adds its wall time to `totals[stage]`."""

    def __init__(self, totals: dict, stage: str, fn):
        self.totals, self.stage, self.fn = totals, stage, fn

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.stage] += time.perf_counter() - t0


def forward_attr(runner) -> str:
    # `forward` (the compiled or eager callable); `model` in trees from before --compile, for baselines
    return "forward" if hasattr(runner, "forward") else "model"


def instrument(engine: LLMEngine, totals: dict) -> None:
    engine.scheduler.schedule = StageClock(totals, "schedule", engine.scheduler.schedule)
    engine.runner.prepare = StageClock(totals, "prepare", engine.runner.prepare)
    name = forward_attr(engine.runner)
    setattr(engine.runner, name, StageClock(totals, "forward", getattr(engine.runner, name)))
    engine.sampler = StageClock(totals, "sample", engine.sampler)
    engine._update = StageClock(totals, "update", engine._update)


def start_batch(engine: LLMEngine, batch_size: int, prompt_len: int, max_tokens: int, tag: str) -> None:
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(batch_size)
    for i in range(batch_size):
        ids = torch.randint(100, vocab - 100, (prompt_len,), generator=g).tolist()
        engine.add_request(f"{tag}-{i}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                             temperature=0.0))
    # prefill (and one decode) until every request decodes one token per step
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()


def forward_split(engine: LLMEngine, steps: int) -> tuple[float, float]:
    """(GEMM s, attention s) per step, from the profiler's self times."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    gemm = attn = 0.0
    for ev in prof.key_averages():
        if ev.key in GEMM_OPS:
            gemm += ev.self_cpu_time_total
        elif ev.key in ATTENTION_OPS:
            attn += ev.self_cpu_time_total
    return gemm / 1e6 / steps, attn / 1e6 / steps


def measure(engine: LLMEngine, batch_size: int, prompt_len: int, steps: int) -> dict:
    totals: dict = defaultdict(float)
    max_tokens = 2 * steps + 8
    start_batch(engine, batch_size, prompt_len, max_tokens, f"b{batch_size}")
    real = {name: getattr(engine, name) for name in ("sampler", "_update")}
    fwd = forward_attr(engine.runner)
    real_sched, real_prep, real_model = engine.scheduler.schedule, engine.runner.prepare, getattr(engine.runner, fwd)
    instrument(engine, totals)
    step_s, cpu_s = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.step()
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    engine.scheduler.schedule, engine.runner.prepare = real_sched, real_prep
    setattr(engine.runner, fwd, real_model)
    for name, fn in real.items():
        setattr(engine, name, fn)
    gemm_s, attn_s = forward_split(engine, max(3, steps // 3))
    for r in list(engine.scheduler.running):
        engine.abort_request(r.group_id)
    engine.step()
    per_step = {k: v / steps for k, v in totals.items()}
    step = statistics.median(step_s)
    mean_step = sum(step_s) / steps
    return {"batch": batch_size, "step_ms": 1e3 * step, "mean_step_ms": 1e3 * mean_step,
            "cpu_ms": 1e3 * statistics.median(cpu_s),
            **{f"{k}_ms": 1e3 * per_step.get(k, 0.0) for k in STAGES},
            "gemm_ms": 1e3 * gemm_s, "attention_ms": 1e3 * attn_s,
            "overhead_ms": 1e3 * (mean_step - gemm_s - attn_s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="run the forward through torch.compile")
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's choice)")
    args = p.parse_args(argv)
    options = {"compile": True} if args.compile else {}  # absent from trees before --compile (baselines)
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                    kv_cache_bytes=args.kv_cache_mib * 2**20, **options))
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        rows.append(measure(engine, b, args.prompt_len, args.steps))
        print(f"batch {b}: step {rows[-1]['step_ms']:.2f} ms", flush=True)
    t = Table(title=f"decode step by stage, {args.model} {engine.dtype}, prompts {args.prompt_len} tokens, "
                    f"{torch.get_num_threads()} threads (ms per step; stages from wall clocks, GEMM/attention "
                    "from torch.profiler self times; cpu: the process's CPU time per step, which a busy box "
                    "inflates less than wall time)")
    cols = ("batch", "step_ms", "cpu_ms", "schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "update_ms",
            "gemm_ms", "attention_ms", "overhead_ms")
    for c in cols:
        t.add_column(c.removesuffix("_ms") + (" ms" if c.endswith("_ms") else ""), justify="right")
    for r in rows:
        t.add_row(str(r["batch"]), *(f"{r[c]:.2f}" for c in cols[1:]))
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
