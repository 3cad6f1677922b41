"""The CUDA check to run when a GPU is lent: the CUDA tests, then decode bandwidth as a % of HBM and prefill MFU on
the default model, printed as one table. Without CUDA it says so and exits 0. About 3-5 minutes on an H200.

    PYTHONPATH=src python benchmarks/cuda_check.py [--decode-tokens 256] [--prefill-prompts 16 --prefill-len 1024]

Decode GB/s = bytes a batch-1 step reads (every weight once, plus the K/V it attends over) / time per output
token; MFU = the prefill's FLOPs (2 x parameters x tokens, plus attention's QK^T and PV) / time / the datasheet's
dense bf16 peak. Peaks come from pernode's published-accelerator table, matched by the device's name.
"""
from __future__ import annotations

import argparse
import pydoc_data.topics
import re
import statistics
import subprocess
import sys
import time

import torch

from pernode import LLM, SamplingParams
from pernode.measure.profile.accelerators import PUBLISHED_ACCELERATORS, TB

# Tests that run only with a GPU (each skips cleanly without one): their names all say where they run.
CUDA_TESTS = "cuda or fp8 or semi_structured"


def published_peaks(device_name: str) -> dict | None:
    """The datasheet row whose model (its name's first word) is a word of the device's name: "NVIDIA H200" finds
    "H200 SXM", "NVIDIA L40S" finds "L40S" and not "L4"."""
    words = set(re.split(r"[^0-9A-Z]+", device_name.upper()))
    return next((row for key, row in PUBLISHED_ACCELERATORS.items() if key.split()[0].upper() in words), None)


def run_cuda_tests(timeout_s: int) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", CUDA_TESTS, "tests/"]
    print("$", " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s} s"
    print(done.stdout[-3000:], done.stderr[-1000:], flush=True)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return f"rc {done.returncode}: {last}"


def prompt_ids(llm: LLM, count: int, length: int) -> list[list[int]]:
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = llm.tokenizer.encode(text)
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step streams: every parameter and weight buffer once, the embedding table excepted (a step
    reads one row of it) unless the lm_head shares it."""
    head = getattr(model, "lm_head", None)
    tied = head is not None and getattr(head, "weight", None) is getattr(model.embed_tokens, "weight", None)
    total = 0
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or (name.startswith("embed_tokens") and not tied):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--prefill-prompts", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--tests-timeout-s", type=int, default=240)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; nothing to check (exit 0).")
        return 0
    device_name = torch.cuda.get_device_name(0)
    peaks = published_peaks(device_name)
    rows: list[tuple[str, str]] = [("device", device_name)]
    rows.append(("CUDA tests", "skipped" if args.skip_tests else run_cuda_tests(args.tests_timeout_s)))

    llm = LLM(args.model, device="cuda", dtype="bfloat16", gguf_weights="float", max_model_len=4096)
    model, config = llm.engine.model, llm.engine.model.config
    params = sum(p.numel() for p in model.parameters())
    step_bytes = weight_bytes(model)
    # batch-1 decode: a short prompt, then decode-tokens steps; time per output token from the total minus TTFT
    short = prompt_ids(llm, 1, 32)
    greedy = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(short, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm
    tpots = []
    for _ in range(args.decode_rounds):
        torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate(short, greedy)
        torch.cuda.synchronize()
        tpots.append((time.perf_counter() - started) / args.decode_tokens)
    tpot = statistics.median(tpots)
    kv_bytes = config.kv_bytes_per_token(2) * (32 + args.decode_tokens / 2)  # mean context over the decode
    decode_gbs = (step_bytes + kv_bytes) / tpot / 1e9
    rows += [("parameters", f"{params / 1e6:.1f} M; {step_bytes / 1e6:.1f} MB read per decode step"),
             ("batch-1 TPOT", f"{tpot * 1e3:.2f} ms ({1 / tpot:.0f} tok/s; median of {args.decode_rounds})"),
             ("decode bandwidth", f"{decode_gbs:.0f} GB/s" + (
                 f" = {100 * decode_gbs * 1e9 / (peaks['bandwidth_tbs'] * TB):.1f}% of {peaks['bandwidth_tbs']} TB/s"
                 if peaks else " (no published peak for this device)"))]
    # prefill: many long prompts, one output token each
    prompts = prompt_ids(llm, args.prefill_prompts, args.prefill_len)
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(prompts[:2], one)  # warm
    torch.cuda.synchronize()
    started = time.perf_counter()
    llm.generate(prompts, one)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - started
    tokens = sum(len(p) for p in prompts)
    # attention: QK^T and PV, causal (half the square), per layer: 2 x 2 x heads x head_dim x L^2 / 2
    attn = sum(2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * len(p) ** 2
               for p in prompts)
    flops = 2 * params * tokens + attn
    achieved = flops / prefill_s
    rows += [("prefill", f"{tokens} tokens in {prefill_s:.2f} s = {tokens / prefill_s:,.0f} tok/s, "
                         f"{achieved / 1e12:.1f} TFLOP/s"),
             ("prefill MFU", f"{100 * achieved / (peaks['bf16_tflops'] * 1e12):.2f}% of {peaks['bf16_tflops']} "
                             f"bf16 TFLOP/s (dense)" if peaks else "no published peak for this device")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
