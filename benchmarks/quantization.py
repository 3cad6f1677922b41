"""Quantization methods on the default model, measured in one run: checkpoint MB, perplexity (one forward per
window, and fed 8 tokens per forward as decode runs), batch-1 decode tok/s (with the achieved weight bandwidth),
batch-64 decode throughput, each next to fp32.

Every method writes its checkpoint, and the numbers come from the model re-loaded from that checkpoint the way
the engine loads it. "fp32" is the default GGUF (Q4_1) dequantized to fp32: the starting point of every method.

    PYTHONPATH=src .venv/bin/python benchmarks/quantization.py --quick       # a few minutes
    PYTHONPATH=src .venv/bin/python benchmarks/quantization.py --methods rtn-int8,gptq-int4-g64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from decode_speed import decode_tokens_per_s, llama_cpp_decode_tokens_per_s, weight_bytes_per_token  # noqa: E402
from pernode.compress import CALIBRATED, quantize_model  # noqa: E402
from pernode.compress.lm_head import quantize_lm_head  # noqa: E402
from pernode.compress.checkpoint import checkpoint_bytes, load_model, save_quantized  # noqa: E402
from pernode.compress.scheme import QuantScheme  # noqa: E402
from pernode.compress.smoothquant import W8A8  # noqa: E402
from pernode.evaluate.perplexity import calibration_windows, evaluate_perplexity  # noqa: E402

CONFIGS = {  # name -> (method, scheme); "+lm8": the lm_head quantized too (int8 g32, `--quantize-lm-head`)
    "fp32": (None, None),
    "rtn-int8": ("rtn", QuantScheme(8)),
    "rtn-int8+lm8": ("rtn", QuantScheme(8)),
    "rtn-int4-g64": ("rtn", QuantScheme(4, 64)),
    "rtn-int4-g64+lm8": ("rtn", QuantScheme(4, 64)),
    "rtn-int4-g32": ("rtn", QuantScheme(4, 32)),
    "gptq-int4-g64": ("gptq", QuantScheme(4, 64)),
    "gptq-int4-g64+lm8": ("gptq", QuantScheme(4, 64)),
    "awq-int4-g64": ("awq", QuantScheme(4, 64)),
    "awq-int4-g64+lm8": ("awq", QuantScheme(4, 64)),
    "w8a8": ("w8a8", W8A8),
    "smoothquant-w8a8": ("smoothquant", W8A8),
    "llm-int8": ("llm-int8", W8A8),
}


def linear_throughput(batches=(64, 256), shapes=((576, 3072), (1536, 576)), repeats: int = 20) -> list[dict]:
    """One projection in isolation: fp32 F.linear vs W8A8 (dynamic per-token int8 x int8 via torch._int_mm,
    quantization of x included) vs int8/int4 weight-only, in GFLOP/s."""
    from pernode.kernels.quant_linear import QuantLinear, W8A8Linear
    from pernode.compress.scheme import quantize_weight

    def timed(fn):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    rows = []
    for k, n in shapes:
        w = torch.randn(n, k)
        w8a8 = W8A8Linear(k, n, W8A8)
        w8a8.set_quantized(*quantize_weight(w, QuantScheme(8))[:2])
        woq8 = QuantLinear(k, n, QuantScheme(8))
        woq8.set_quantized(*quantize_weight(w, QuantScheme(8)))
        for m in batches:
            x = torch.randn(m, k)
            flops = 2 * m * k * n
            t_fp = timed(lambda: torch.nn.functional.linear(x, w))
            t_q = timed(lambda: w8a8(x))
            t_w = timed(lambda: woq8(x))
            rows.append({"k": k, "n": n, "m": m, "fp32_gflops": flops / t_fp / 1e9, "w8a8_gflops": flops / t_q / 1e9,
                         "woq_int8_gflops": flops / t_w / 1e9, "w8a8_speedup": t_fp / t_q})
    return rows


def interleaved_speeds(paths: dict[str, str], steps1: int, steps64: int, rounds: int = 2,
                       peer_gguf: str | None = None, threads: int = 1) -> dict[str, tuple]:
    """Best-of-`rounds` (b1 tok/s, b64 tok/s, weight bytes/token) per model, measured round-robin so that load from
    other processes hits every method alike; with `peer_gguf`, llama.cpp's batch-1 decode of it in each round."""
    models = {name: load_model(path)[0] for name, path in paths.items()}
    best = {name: [0.0, 0.0, weight_bytes_per_token(m)] for name, m in models.items()}
    peer = None
    for _ in range(rounds):
        for name, m in models.items():
            best[name][0] = max(best[name][0], decode_tokens_per_s(m, 1, steps1))
            best[name][1] = max(best[name][1], decode_tokens_per_s(m, 64, steps64, prompt_len=4, warmup=1))
        if peer_gguf:
            tps = llama_cpp_decode_tokens_per_s(peer_gguf, threads, max(steps1, 32))
            peer = tps if peer is None or tps is None else max(peer, tps)
    out = {name: tuple(v) for name, v in best.items()}
    if peer:
        out["llama.cpp"] = (peer, None, os.path.getsize(peer_gguf))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="4 windows of 512 tokens, short decode runs")
    ap.add_argument("--methods", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and kernel threads (default 1: robust on a CPU shared with other jobs)")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp's batch-1 decode of the same GGUF")
    ap.add_argument("--linear-only", action="store_true", help="only the single-projection W8A8 throughput table")
    ap.add_argument("--out", default=None, help="folder for checkpoints and results.json (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["PERNODE_QUANT_THREADS"] = str(args.threads)
    seq_len, windows = (512, 4) if args.quick else (2048, 8)
    steps1, steps64 = (16, 2) if args.quick else (64, 4)
    out = args.out or tempfile.mkdtemp(prefix="pernode-quant-")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: allowed {', '.join(CONFIGS)}")

    if args.linear_only:
        names = []
    rows = []
    calib = None
    for name in names:
        method, scheme = CONFIGS[name]
        t0 = time.perf_counter()
        model, source = load_model(args.model)
        path, quant_s, report = args.model, 0.0, {}
        if method:
            if method in CALIBRATED and calib is None:
                calib = calibration_windows(source.tokenizer, 512, args.calib_windows)
            report = quantize_model(model, method, scheme, calib, quiet=True)
            if name.endswith("+lm8"):
                quantize_lm_head(model)
            quant_s = time.perf_counter() - t0
            path = os.path.join(out, name)
            save_quantized(model, source, path, scheme, method)
            del model
            model, source = load_model(path)  # what gets served
        size_mb = checkpoint_bytes(path) / 1e6 if method else sum(
            t.numel() * 4 for t in model.hf_state_dict().values()) / 1e6
        ppl = evaluate_perplexity(model, source.tokenizer, seq_len=seq_len, max_windows=windows)
        # the same windows fed 8 tokens per forward: the decode kernels' numerics (int4: int8 x)
        ppl_decode = evaluate_perplexity(model, source.tokenizer, seq_len=seq_len, max_windows=windows,
                                         step_tokens=8)
        label = (scheme.label() + (" + lm_head w8-g32" if name.endswith("+lm8") else "")) if scheme else "fp32"
        row = {"name": name, "method": method or "fp32", "scheme": label,
               "path": path, "checkpoint_mb": size_mb, "ppl": ppl.perplexity, "nll": ppl.mean_nll,
               "ppl_decode_path": ppl_decode.perplexity,
               "ppl_tokens": ppl.num_tokens, "quantize_s": quant_s}
        if report.get("outliers"):
            row["outlier_columns_mean"] = sum(v["mean_outlier_columns"] for v in report["outliers"].values()) / len(
                report["outliers"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    peer_gguf = None
    if rows and not args.no_peer:
        from pernode.models.registry import resolve_model

        src = resolve_model(args.model)
        peer_gguf = src.path if src.format == "gguf" else None
    if rows:  # speeds last, all models interleaved: load from other jobs varies ~2x over minutes
        speeds = interleaved_speeds({r["name"]: r["path"] for r in rows}, steps1, steps64, peer_gguf=peer_gguf,
                                    threads=args.threads)
        for r in rows:
            tps1, tps64, bytes_tok = speeds[r["name"]]
            r.update(decode_b1_tok_s=tps1, decode_b1_gbs=tps1 * bytes_tok / 1e9, weight_mb_per_token=bytes_tok / 1e6,
                     decode_b64_tok_s=tps64)
    lin = linear_throughput()
    print("\nsingle projection, batch m: GFLOP/s (W8A8 includes quantizing x per token)")
    print("| K x N | m | fp32 | W8A8 int8 GEMM | x fp32 | int8 weight-only |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in lin:
        print(f"| {r['k']}x{r['n']} | {r['m']} | {r['fp32_gflops']:.0f} | {r['w8a8_gflops']:.0f} | "
              f"{r['w8a8_speedup']:.2f} | {r['woq_int8_gflops']:.0f} |")
    if not rows:
        return 0
    base = next((r for r in rows if r["name"] == "fp32"), rows[0])
    print(f"\nmodel {args.model}; ppl on {base['ppl_tokens']} predictions ({windows} windows x {seq_len}); "
          f"{args.threads} thread(s)")
    print("| config | weights | ckpt MB | ppl | d ppl | ppl, decode path | b1 tok/s | x fp32 | b1 GB/s (weights) "
          "| b64 tok/s | x fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['scheme']} | {r['checkpoint_mb']:.0f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['ppl_decode_path']:.3f} | {r['decode_b1_tok_s']:.1f} | "
              f"{r['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f} | {r['decode_b1_gbs']:.1f} "
              f"({r['weight_mb_per_token']:.0f} MB) | {r['decode_b64_tok_s']:.0f} | "
              f"{r['decode_b64_tok_s'] / base['decode_b64_tok_s']:.2f} |")
    if "llama.cpp" in speeds:
        tps, _, size = speeds["llama.cpp"]
        print(f"| llama.cpp (peer) | its GGUF as shipped | {size / 1e6:.0f} | | | | {tps:.1f} | "
              f"{tps / base['decode_b1_tok_s']:.2f} | | | |")
        rows.append({"name": "llama.cpp", "decode_b1_tok_s": tps, "gguf_mb": size / 1e6})
    else:
        print("llama.cpp peer: not measured (llama-cpp-python missing, --no-peer, or not a GGUF model)")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\ncheckpoints and results.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
