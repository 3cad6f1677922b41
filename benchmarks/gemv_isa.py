"""The decode GEMVs on this CPU: per-layer time and achieved GB/s at 1 and 3 rows, batch-1 TPOT and a 400-token
prefill on the default model, with the instruction set the kernels were built for.

Run it under two checkouts (each with its own .venv) to compare kernel builds on the same machine in one sitting,
alternating, e.g. before and after a kernel change:

    for r in 1 2; do (cd /tmp/old && .venv/bin/python benchmarks/gemv_isa.py --label old); \
                     .venv/bin/python benchmarks/gemv_isa.py --label new; done
"""
import argparse
import time

import torch

from pernode import LLM, SamplingParams
from pernode.config import DEFAULT_MODEL
from pernode.serve.kernels.cpu_features import has_vnni, multiplies_int8_natively
from pernode.serve.kernels.jit import cpu_signature

LAYERS = ("layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj", "lm_head")


def seconds_per_call(fn, min_s: float = 0.5) -> float:
    fn()
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < min_s:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="this build")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    flags = set(cpu_signature().split())
    isa = "avx512f" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags else "scalar"
    llm = LLM(args.model, max_model_len=1024)
    int8_x = ("VNNI" if has_vnni() else "AVX2, decode-sized calls (up to 8 rows)" if multiplies_int8_natively()
              else "none: dequantized again")
    print(f"[{args.label}] CPU ISA {isa}, {torch.get_num_threads()} threads, dtype {llm.engine.dtype}, "
          f"integer path for int8 x: {int8_x}")
    modules = dict(llm.engine.model.named_modules())
    with torch.inference_mode():
        for name in LAYERS:
            layer = modules[name]
            if not hasattr(layer, "_run_decode"):
                continue
            nbytes = layer.qweight.numel() * layer.qweight.element_size()
            for rows in (1, 3):
                x = torch.randn(rows, layer.in_features).to(llm.engine.dtype)
                s = seconds_per_call(lambda: layer._run_decode(x))
                print(f"[{args.label}] {name} ({layer.out_features}x{layer.in_features}) rows={rows}: "
                      f"{s * 1e3:.3f} ms, {nbytes / s / 1e9:.1f} GB/s")
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, **greedy))
    started = time.perf_counter()
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=65, **greedy))
    decode_s = (time.perf_counter() - started) / 64  # the first token is the prefill's
    started = time.perf_counter()
    llm.generate([list(range(1000, 1400))], SamplingParams(max_tokens=1, **greedy))
    prefill_s = time.perf_counter() - started
    print(f"[{args.label}] batch 1: TPOT ~{decode_s * 1e3:.1f} ms ({1 / decode_s:.1f} tok/s); "
          f"400-token prefill {prefill_s * 1e3:.0f} ms ({400 / prefill_s:.0f} tok/s)")


if __name__ == "__main__":
    main()
