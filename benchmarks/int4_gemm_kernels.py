"""The int4 kernels for many rows, side by side on the default model's layer shapes (random Q4_1-like weights):
the dequantized-tile GEMM (`woq_gemm`) against the int16-x GEMM (`woq_gemm_int16x`) at prompt-sized row counts,
and the int8-x GEMV (`woq_linear`, passes of 8 rows) against the panel kernel (`woq_panel_gemm`) at decode-sized
ones. Best of --repeats per kernel, alternating; ratios in the same run.

    PYTHONPATH=src python benchmarks/int4_gemm_kernels.py [--threads 1,2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import time

import torch

from pernode.quant_format import pack_int4
from pernode.serve.kernels.quant_linear import load_kernel

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prompt-rows", type=int, default=512)
    p.add_argument("--decode-rows", default="16,32,48")
    args = p.parse_args(argv)
    if load_kernel() is None:
        raise SystemExit("the C++ kernels did not build")
    ops = torch.ops.pernode
    gen = torch.Generator().manual_seed(0)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (n, k) in SHAPES.items():
            w = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen))
            scale = (torch.rand(n, k // 32, generator=gen) * 0.02 + 0.01).half().float()
            term = (-torch.rand(n, k // 32, generator=gen) * 0.1).half().float()
            m = args.prompt_rows
            x = torch.randn(m, k, generator=gen)
            tiles = best_of(lambda: ops.woq_gemm(x, w, scale, term, 4, 32), args.repeats)
            int16 = best_of(lambda: ops.woq_gemm_int16x(x, w, scale, term, 32, threads), args.repeats)
            flop = 2 * m * n * k
            print(f"{threads} thread(s) {name:8s} {m} rows: tiles {1e3 * tiles:6.2f} ms ({flop / tiles / 1e9:5.1f} "
                  f"GFLOP/s), int16-x GEMM {1e3 * int16:6.2f} ms ({flop / int16 / 1e9:5.1f}): {tiles / int16:.2f}x")
            for m in (int(r) for r in args.decode_rows.split(",")):
                x = torch.randn(m, k, generator=gen)
                gemv = best_of(lambda: ops.woq_linear(x, w, scale.half(), term.half(), 4, 32, threads, True),
                               args.repeats)
                panel = best_of(lambda: ops.woq_panel_gemm(x, w, scale.half(), term.half(), 32, threads),
                                args.repeats)
                print(f"{threads} thread(s) {name:8s} {m:3d} rows: int8-x GEMV {1e3 * gemv:6.3f} ms, panel "
                      f"{1e3 * panel:6.3f} ms: {gemv / panel:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
