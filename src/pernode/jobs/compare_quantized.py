"""Quantize one model several ways and measure each the way it is served: checkpoint size, perplexity, decode speed.

Every configuration is written as a checkpoint, re-loaded from disk (what `pernode serve --model DIR` runs) and
then measured. Speeds come last and round-robin over all models, best of `rounds`: load from other processes
moves absolute numbers by ~2x over minutes on a shared CPU, and interleaving hits every configuration alike.
`pernode report` runs a few fast configurations; `benchmarks/quantization.py` runs them all.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from pernode.shrink import CALIBRATED, quantize_model
from pernode.shrink.checkpoint import checkpoint_bytes, load_model, save_quantized
from pernode.shrink.methods.lm_head import quantize_lm_head
from pernode.quant_format import QuantScheme
from pernode.shrink.methods.smoothquant import W8A8
from pernode.shrink.evaluate.perplexity import calibration_windows, evaluate_perplexity
from pernode.measure.profile.decode_speed import decode_tokens_per_s, llama_cpp_decode_tokens_per_s, weight_bytes_per_token

# name -> (method, scheme); "+lm8": the lm_head quantized too (int8 g32, `--quantize-lm-head`)
CONFIGS: dict[str, tuple[str | None, QuantScheme | None]] = {
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
    "smoothquant-w8a8-auto": ("smoothquant", W8A8),
    "llm-int8": ("llm-int8", W8A8),
}
OPTIONS = {"smoothquant-w8a8-auto": {"alpha": "auto"}}  # method options beyond the defaults


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}: allowed {', '.join(CONFIGS)}")


def build_and_score(model_name: str, names: list[str], out_dir: str, seq_len: int = 512, windows: int = 4,
                    calib_windows: int = 16, decode_path_ppl: bool = True,
                    progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Per configuration: quantize, save under out_dir/NAME, re-load, perplexity (one forward per window and,
    with `decode_path_ppl`, fed 8 tokens per forward as decode runs). One dict per configuration."""
    check_names(names)
    rows, calib = [], None
    for name in names:
        method, scheme = CONFIGS[name]
        started = time.perf_counter()
        model, source = load_model(model_name)
        path, quantize_s, report = model_name, 0.0, {}
        if method:
            if method in CALIBRATED and calib is None:
                calib = calibration_windows(source.tokenizer, 512, calib_windows)
            report = quantize_model(model, method, scheme, calib, quiet=True, **OPTIONS.get(name, {}))
            if name.endswith("+lm8"):
                quantize_lm_head(model)
            quantize_s = time.perf_counter() - started
            path = os.path.join(out_dir, name)
            save_quantized(model, source, path, scheme, method)
            del model
            model, source = load_model(path)  # what gets served
        size_mb = checkpoint_bytes(path) / 1e6 if method else sum(
            t.numel() * t.element_size() for t in model.hf_state_dict().values()) / 1e6
        ppl = evaluate_perplexity(model, source.tokenizer, seq_len=seq_len, max_windows=windows)
        label = (scheme.label() + (" + lm_head w8-g32" if name.endswith("+lm8") else "")) if scheme else "fp32"
        row = {"name": name, "method": method or "fp32", "scheme": label, "path": path, "checkpoint_mb": size_mb,
               "ppl": ppl.perplexity, "nll": ppl.mean_nll, "ppl_tokens": ppl.num_tokens, "quantize_s": quantize_s}
        if decode_path_ppl:  # the decode kernels' numerics (int4 quantizes x to int8)
            row["ppl_decode_path"] = evaluate_perplexity(model, source.tokenizer, seq_len=seq_len,
                                                         max_windows=windows, step_tokens=8).perplexity
        if report.get("outliers"):
            stats = report["outliers"].values()
            row["outlier_columns_mean"] = sum(v["mean_outlier_columns"] for v in stats) / len(stats)
        rows.append(row)
        if progress:
            progress(row)
        del model
    return rows


def measure_speeds(rows: list[dict], steps1: int = 16, steps64: int | None = 2, rounds: int = 2,
                   peer_gguf: str | None = None, threads: int = 1) -> dict | None:
    """Adds decode_b1_tok_s (+ GB/s of weights), decode_b64_tok_s to each row, round-robin, best of `rounds`;
    with `peer_gguf`, llama.cpp's batch-1 decode of it in each round, returned as a row (None if not measured)."""
    models = {r["name"]: load_model(r["path"])[0] for r in rows}
    best = {name: [0.0, 0.0] for name in models}
    peer = None
    for _ in range(rounds):
        for name, m in models.items():
            best[name][0] = max(best[name][0], decode_tokens_per_s(m, 1, steps1))
            if steps64:
                best[name][1] = max(best[name][1], decode_tokens_per_s(m, 64, steps64, prompt_len=4, warmup=1))
        if peer_gguf:
            tps = llama_cpp_decode_tokens_per_s(peer_gguf, threads, max(steps1, 32))
            peer = tps if peer is None or tps is None else max(peer, tps)
    for r in rows:
        tps1, tps64 = best[r["name"]]
        bytes_per_token = weight_bytes_per_token(models[r["name"]])
        r.update(decode_b1_tok_s=tps1, decode_b1_gbs=tps1 * bytes_per_token / 1e9,
                 weight_mb_per_token=bytes_per_token / 1e6, decode_b64_tok_s=tps64 or None)
    if not peer:
        return None
    return {"name": "llama.cpp", "scheme": "its GGUF as shipped", "decode_b1_tok_s": peer,
            "gguf_mb": os.path.getsize(peer_gguf) / 1e6}
