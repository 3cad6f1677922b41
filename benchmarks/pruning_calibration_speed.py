"""Calibration speed of GPTQ and SparseGPT, before and after the calibration changes, interleaved in one run on the
first few decoder layers of the default model, with each phase's share of the time from cProfile (1 thread).

"Before" is the schedule the methods had: one forward over all windows, the Hessian forward runs the whole layer,
and GPTQ installs each layer's quantized projections at once, so the next layer calibrates through the
weight-only-quantized kernel. "After": forwards of 8 windows at a time (Hessians summed over them), the Hessian
forward stops once every projection has seen its input, and the next layer calibrates on a float GEMM of the
dequantized weights (the quantized layers are installed after). Peak memory is printed for each.

Times are the process's CPU time (1 thread), profiled on that clock too: on a machine shared with other jobs the
wall time of a niced process measures mostly the others, its CPU time mostly itself. Rounds alternate the order.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/pruning_calibration_speed.py --layers 1 --rounds 2
    PYTHONPATH=src .venv/bin/python benchmarks/pruning_calibration_speed.py --layers 30 --rounds 1 --threads 2  # quiet

The issue's under-6-minutes check reads the `wall_s` of the "after" rows at 30 layers on two threads; with
`--variants after` it skips the former schedule (about half of the run's time).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import os
import pstats
import time

import torch

from pernode.quant_format import QuantScheme
from pernode.serve.models.loader import load_model
from pernode.shrink.calibration import run_sequential
from pernode.shrink.methods.common import projections
from pernode.shrink.methods.gptq import GPTQ, layer_hessians
from pernode.shrink.pruning import pruner as pruner_module
from pernode.shrink.pruning.calibration_text import held_out_windows
from pernode.shrink.pruning.sparsegpt import SparseGPT


class GPTQBefore(GPTQ):
    """GPTQ with the former schedule: full Hessian forward, quantized layers installed before the next forward."""

    def apply(self, model, scheme, calibration, quiet=False):
        def process(i, layer, x, fwd):
            hessians = layer_hessians(layer, x, fwd, stop_early=False)
            for parent, attr, _ in list(projections(layer)):
                self.quantize_linear(parent, attr, hessians[attr], scheme, f"layers.{i}.{attr}")

        run_sequential(model, calibration, process, "GPTQ", quiet)  # one forward over all windows
        return {}


@contextlib.contextmanager
def full_hessian_forward():
    """SparseGPT's former schedule: one forward over all windows, the Hessian forward runs the whole layer."""
    saved = pruner_module.layer_hessians, pruner_module.CALIBRATION_CHUNK_WINDOWS
    pruner_module.layer_hessians = functools.partial(layer_hessians, stop_early=False)
    pruner_module.CALIBRATION_CHUNK_WINDOWS = None
    try:
        yield
    finally:
        pruner_module.layer_hessians, pruner_module.CALIBRATION_CHUNK_WINDOWS = saved


# phase -> (how it is found in cProfile's table, whether its cumulative time counts)
PHASES = {
    "forward GEMM fp32": ("torch._C._nn.linear", False),
    "forward GEMM woq": ("woq_gemm", False),
    "attention": ("paged_attention", False),
    "Hessian X^T X (addmm)": ("addmm_", False),
    "cholesky + inverse": ("inverse_hessian_cholesky", True),
    "group-scale observer": ("mse_qparams", True),
    "GPTQ column loop": ("gptq_quantize_weight", True),
    "SparseGPT column loop": ("sparsegpt_prune_weight", True),
}


def phase_times(stats: pstats.Stats) -> dict[str, float]:
    found = dict.fromkeys(PHASES, 0.0)
    for (_, _, func), (_, _, tottime, cumtime, _) in stats.stats.items():
        for phase, (needle, cumulative) in PHASES.items():
            if needle in func:
                found[phase] += cumtime if cumulative else tottime
    # the loops' cumulative times hold the Cholesky and the observer: report what is left of them
    inner = found["cholesky + inverse"] + found["group-scale observer"]
    for loop in ("GPTQ column loop", "SparseGPT column loop"):
        if found[loop]:
            found[loop] = max(0.0, found[loop] - inner)
    return found


def peak_rss_mb(reset: bool = False) -> float:
    """This process's peak resident memory (Linux VmHWM); `reset` starts a new peak (clear_refs 5)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except OSError:
        return float("nan")


def run_once(name: str, variant: str, calib: torch.Tensor, layers: int) -> tuple[float, float, dict[str, float]]:
    model, _ = load_model("smollm2-135m")
    peak_rss_mb(reset=True)
    model.layers = model.layers[:layers]
    profiler = cProfile.Profile(time.process_time)
    started, wall = time.process_time(), time.perf_counter()
    profiler.enable()
    if name == "gptq":
        cls = GPTQBefore if variant == "before" else GPTQ
        cls().apply(model, QuantScheme(4, 64), calib, quiet=True)
    else:
        with full_hessian_forward() if variant == "before" else contextlib.nullcontext():
            SparseGPT(0.5).apply(model, calib, quiet=True)
    profiler.disable()
    total = time.process_time() - started
    return total, time.perf_counter() - wall, phase_times(pstats.Stats(profiler))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="decoder layers calibrated (the default model has 30)")
    ap.add_argument("--calib-windows", type=int, default=97, help="windows of 512 tokens (97 ~ 50k tokens)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default="gptq,sparsegpt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time then sums over them)")
    ap.add_argument("--variants", default="before,after", help="before,after (interleaved) or one of them")
    args = ap.parse_args()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - {"before", "after"}:
        raise SystemExit(f"--variants {args.variants!r}: allowed before, after or before,after")
    torch.set_num_threads(args.threads)
    _, source = load_model("smollm2-135m")
    calib = held_out_windows(source.tokenizer, 512, args.calib_windows)
    print(f"calibration {tuple(calib.shape)} = {calib.numel()} tokens; {args.layers} layers; load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    times = {(m, v): [] for m in methods for v in variants}
    walls = {(m, v): [] for m in methods for v in variants}
    phases = {(m, v): dict.fromkeys(PHASES, 0.0) for m in methods for v in variants}
    run_once(methods[0], "after", calib[:2], 1)  # builds/loads the kernels outside the timed rounds
    for r in range(args.rounds):
        for m in methods:
            for v in (variants if r % 2 == 0 else variants[::-1]):
                total, wall, ph = run_once(m, v, calib, args.layers)
                times[(m, v)].append(total)
                walls[(m, v)].append(wall)
                for k, t in ph.items():
                    phases[(m, v)][k] += t
                print(json.dumps({"round": r, "method": m, "variant": v, "cpu_s": round(total, 1),
                                  "wall_s": round(wall, 1),
                                  "peak_rss_mb": round(peak_rss_mb()), "load": round(os.getloadavg()[0], 1)}),
                      flush=True)
    print(f"\n| method | variant | wall s, all layers (best) | CPU s per layer (best) | speed-up over {variants[0]} | "
          + " | ".join(PHASES) + " | other |")
    print("|---|---|---:|---:|---:|" + "---:|" * (len(PHASES) + 1))
    for m in methods:
        for v in variants:
            med = min(times[(m, v)])  # best of the rounds: load only ever adds time
            base = min(times[(m, variants[0])])
            total = sum(times[(m, v)])
            shares = [100 * phases[(m, v)][k] / total for k in PHASES]
            other = 100 - sum(shares)
            print(f"| {m} | {v} | {min(walls[(m, v)]):.0f} | {med / args.layers:.2f} | {base / med:.2f}x | "
                  + " | ".join(f"{s:.0f}%" for s in shares) + f" | {other:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
