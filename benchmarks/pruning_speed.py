"""Where the bitmask GEMV (csrc/sparse_gemv.cpp) beats dense, measured in one run: one decoder layer's projections
of the default model's shapes (qkv 576x960, o 576x576, gate_up 576x3072, down 1536x576) at sparsity 0.5 / 0.7 /
0.9 and 1 / 8 / 32 rows, the sparse kernel against what the engine runs for a dense layer (the C++ dense GEMV up to
4 rows, oneDNN's GEMM above), interleaved, best of `--rounds`. Prints the ratio and the bytes each streams.

    PYTHONPATH=src .venv/bin/python benchmarks/pruning_speed.py
    PYTHONPATH=src .venv/bin/python benchmarks/pruning_speed.py --threads 2 --rounds 5
    PYTHONPATH=src .venv/bin/python benchmarks/pruning_speed.py --dtype bfloat16   # the serving default
"""
from __future__ import annotations

import argparse
import os
import time

import torch

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # (in, out) of qkv, o, gate_up, down


def best_time(fn, repeats: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch and kernel threads (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and activations")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    os.environ["PERNODE_QUANT_THREADS"] = str(args.threads)
    from pernode.serve.kernels.dense_linear import Linear
    from pernode.serve.kernels.jit import load_extension
    from pernode.serve.kernels.sparse_linear import SOURCE, SparseLinear

    if not load_extension(SOURCE):
        raise SystemExit("the sparse kernel did not build: nothing to measure")
    torch.manual_seed(0)
    print(f"one decoder layer's projections (SmolLM2-135M shapes), {args.dtype}, {args.threads} thread(s), best of "
          f"{args.rounds}, load {os.getloadavg()[0]:.1f}")
    print("| sparsity | rows | dense us | sparse us | sparse / dense speedup | dense MB | sparse MB | verdict |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        dense_layers, sparse_layers = [], []
        for k, n in SHAPES:
            lin = Linear(k, n, bias=False)
            with torch.no_grad():
                w = torch.randn(n, k)
                drop = torch.rand(n, k).argsort(dim=1)[:, : int(round(k * sparsity))]
                lin.weight.copy_(w.scatter(1, drop, 0.0))
            lin = lin.to(dtype)
            dense_layers.append(lin)
            sparse_layers.append(SparseLinear.from_dense(lin))
        dense_mb = sum(lin.weight.numel() * lin.weight.element_size() for lin in dense_layers) / 1e6
        sparse_mb = sum(s.values.numel() * s.values.element_size() + s.bitmask.numel() + s.row_offsets.numel() * 8
                        for s in sparse_layers) / 1e6
        for rows in [int(b) for b in args.batches.split(",")]:
            xs = [torch.randn(rows, lin.in_features, dtype=dtype) for lin in dense_layers]

            def dense():
                for lin, x in zip(dense_layers, xs):
                    lin(x)

            def sparse():
                for s, x in zip(sparse_layers, xs):
                    torch.ops.pernode.sparse_gemv(x, s.values, s.bitmask, s.row_offsets, None, args.threads)

            with torch.inference_mode():
                td, ts = float("inf"), float("inf")
                for _ in range(2):  # interleaved: a load spike from other jobs hits both
                    td = min(td, best_time(dense, args.repeats, args.rounds))
                    ts = min(ts, best_time(sparse, args.repeats, args.rounds))
            speedup = td / ts
            verdict = "sparse wins" if speedup > 1.05 else "no speedup at this sparsity"
            print(f"| {sparsity:.1f} | {rows} | {td * 1e6:.0f} | {ts * 1e6:.0f} | {speedup:.2f}x | {dense_mb:.1f} | "
                  f"{sparse_mb:.1f} | {verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
