"""Where one batch-1 decode step of the default config goes, op by op (torch.profiler self times, 1 thread: shares
of one thread's time do not depend on how busy the other cores are).

    PYTHONPATH=src python benchmarks/decode_step_ops.py [--steps 30] [--threads 1]

One greedy request (128-token prompt, ignore_eos) is prefilled, then `--steps` decode steps are timed without the
profiler (the step's wall time) and again under it. Each op's self time goes to one bucket; "Python, module calls,
dispatch" is the profiled wall time no op accounts for (the layers' Python, nn.Module calls, the engine's own
bookkeeping). On a busy box the wall times include waits for a core: read the shares, and the step's CPU time.
The bandwidth floor is the bytes of weights one step must read over the measured memory bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import start_batch  # noqa: E402

from pernode.config import EngineConfig  # noqa: E402
from pernode.serve.engine.llm_engine import LLMEngine  # noqa: E402

BUCKETS = [  # (bucket, substrings of op names), first match wins
    # the fused stack's own self time: its GEMVs, norms, rotary and attention are direct C++ calls inside it (the
    # few aten ops it dispatches, index_copy_, silu, mul, add, land in their buckets below)
    ("decoder stack in one C++ call (decoder_stack)", ("decoder_stack",)),
    ("weight GEMVs (woq_linear, incl. the Q8_0 lm_head)", ("woq_linear", "dense_gemv", "aten::mm", "aten::addmm")),
    ("attention (paged_attention)", ("paged_attention",)),
    ("KV writes (index_copy_)", ("index_copy", "write_quantized")),
    ("norms (rms_norm, add_rms_norm)", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("SwiGLU (silu, mul)", ("silu", "aten::mul")),
    ("residual add", ("aten::add",)),
    ("sampling (argmax)", ("argmax", "topk", "multinomial", "sort", "softmax", "cumsum")),
    ("casts and copies (to, copy_, empty)", ("aten::to", "_to_copy", "copy_", "empty", "contiguous", "clone")),
    ("views, splits, gathers, embedding", ("view", "split", "chunk", "narrow", "slice", "select", "as_strided",
                                           "reshape", "index", "embedding")),
]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from the weights: every parameter and buffer but the embedding table (one row is
    gathered) and the rotary tables, the lm_head counted once even where it is tied. A quantized layer counts the
    operands its GEMV streams (fp16 scales and mins where they are exact in fp16), not its stored fp32 qparams."""
    seen, total = set(), 0
    gemv_qparams = {}  # stored qparam buffer -> what the GEMV reads in its place
    for module in model.modules():
        args = getattr(module, "_op_args", None)
        if args is not None:
            gemv_qparams[module.weight_scale.data_ptr()] = args[1]
            if getattr(module, "weight_min", None) is not None and args[2] is not None:
                gemv_qparams[module.weight_min.data_ptr()] = args[2]
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or "embed_tokens" in name or name.endswith(("cos", "sin")):
            continue
        seen.add(t.data_ptr())
        t = gemv_qparams.get(t.data_ptr(), t)
        total += t.numel() * t.element_size()
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight.data_ptr() not in seen and hasattr(head, "weight"):
        total += head.weight.numel() * head.weight.element_size()
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bandwidth-gbs", type=float, default=27.0, help="memory bandwidth for the floor (profile's)")
    args = p.parse_args(argv)
    engine = LLMEngine(EngineConfig(model="smollm2-135m", num_threads=args.threads, kv_cache_bytes=256 * 2**20))
    start_batch(engine, 1, 128, 3 * args.steps + 20, "ops")
    for _ in range(5):
        engine.step()
    walls, cpus = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    profiled = (time.perf_counter() - t0) / args.steps
    per_bucket, calls = defaultdict(float), defaultdict(float)
    for ev in prof.key_averages():
        b = next((b for b, keys in BUCKETS if any(k in ev.key for k in keys)), "other ops")
        per_bucket[b] += ev.self_cpu_time_total / 1e6 / args.steps
        calls[b] += ev.count / args.steps
    per_bucket["Python, module calls, dispatch (wall minus ops)"] = profiled - sum(per_bucket.values())
    step, cpu = statistics.median(walls), statistics.median(cpus)
    model = engine.runner.model
    floor = weight_bytes(model) / (args.bandwidth_gbs * 1e9)
    print(f"batch-1 decode step, {engine.dtype}, {torch.get_num_threads()} thread(s): {1e3 * step:.2f} ms median "
          f"unprofiled ({1e3 * cpu:.2f} ms CPU time), {1e3 * profiled:.2f} ms profiled; weights read per step {weight_bytes(model) / 1e6:.1f} MB, "
          f"floor at {args.bandwidth_gbs:g} GB/s {1e3 * floor:.2f} ms")
    print("| bucket | ops per step | share of the profiled step | CPU ms per step (share x unprofiled CPU time) |")
    print("|---|---:|---:|---:|")
    for b, s in sorted(per_bucket.items(), key=lambda kv: -kv[1]):
        print(f"| {b} | {calls.get(b, 0):.0f} | {100 * s / profiled:.1f}% | {1e3 * cpu * s / profiled:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
