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

from pernode.measure.profile.decode_speed import (decode_blocks_needed, decode_engine, decode_tokens_per_s,
                                                  llama_cpp_decode_tokens_per_s, weight_bytes_per_token)
from pernode.serve.models.loader import load_model
from pernode.shrink.checkpoint import checkpoint_bytes, save_checkpoint
from pernode.shrink.evaluate.perplexity import calibration_windows, evaluate_perplexity
from pernode.shrink.recipes import Recipe


def build_and_score(model_name: str, recipes: list[Recipe], out_dir: str, seq_len: int = 512, windows: int = 4,
                    calib_windows: int = 16, decode_path_ppl: bool = True,
                    progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Per recipe (`recipes_named(["fp32", "gptq-int4-g64+lm8"])`): quantize, save under out_dir/NAME, re-load,
    perplexity (one forward per window and, with `decode_path_ppl`, fed 8 tokens per forward as decode runs).
    One dict per recipe."""
    rows, calib = [], None
    for recipe in recipes:
        started = time.perf_counter()
        model, source = load_model(model_name)
        path, quantize_s, report = model_name, 0.0, {}
        if not recipe.is_float or recipe.pruner is not None:
            if recipe.needs_calibration and calib is None:
                calib = calibration_windows(source.tokenizer, 512, calib_windows)
            report = recipe.apply(model, calib, quiet=True)
            quantize_s = time.perf_counter() - started
            path = os.path.join(out_dir, recipe.name)
            save_checkpoint(model, source, path, recipe)
            del model
            model, source = load_model(path)  # what gets served
        size_mb = (sum(t.numel() * t.element_size() for t in model.hf_state_dict().values()) if path == model_name
                   else checkpoint_bytes(path)) / 1e6
        ppl = evaluate_perplexity(model, source.tokenizer, seq_len=seq_len, max_windows=windows)
        row = {"name": recipe.name, "method": recipe.method, "scheme": recipe.label, "path": path,
               "checkpoint_mb": size_mb, "ppl": ppl.perplexity, "nll": ppl.mean_nll, "ppl_tokens": ppl.num_tokens,
               "quantize_s": quantize_s}
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
    num_blocks = max(decode_blocks_needed(1, steps1),
                     decode_blocks_needed(64, steps64, prompt_len=4, warmup=1) if steps64 else 0)
    engines = {r["name"]: decode_engine(r["path"], num_blocks) for r in rows}
    best = {name: [0.0, 0.0] for name in engines}
    peer = None
    for _ in range(rounds):
        for name, m in engines.items():
            best[name][0] = max(best[name][0], decode_tokens_per_s(m, 1, steps1))
            if steps64:
                best[name][1] = max(best[name][1], decode_tokens_per_s(m, 64, steps64, prompt_len=4, warmup=1))
        if peer_gguf:
            tps = llama_cpp_decode_tokens_per_s(peer_gguf, threads, max(steps1, 32))
            peer = tps if peer is None or tps is None else max(peer, tps)
    for r in rows:
        tps1, tps64 = best[r["name"]]
        bytes_per_token = weight_bytes_per_token(engines[r["name"]].model)
        r.update(decode_b1_tok_s=tps1, decode_b1_gbs=tps1 * bytes_per_token / 1e9,
                 weight_mb_per_token=bytes_per_token / 1e6, decode_b64_tok_s=tps64 or None)
    if not peer:
        return None
    return {"name": "llama.cpp", "scheme": "its GGUF as shipped", "decode_b1_tok_s": peer,
            "gguf_mb": os.path.getsize(peer_gguf) / 1e6}
