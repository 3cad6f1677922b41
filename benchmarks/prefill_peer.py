"""Prefill against llama.cpp on the same GGUF, in one run: `llama-bench` pp512 beside pernode's prefill of a 512-token
prompt (`pernode profile`), and pernode once more with each int4 GEMM kernel it can choose (`PERNODE_GEMM_INPUT`),
round after round, alternating, so that every ratio compares runs minutes apart on the same machine.

    .venv/bin/python benchmarks/prefill_peer.py [--rounds 3] [--threads 2] [--gemm-inputs int16,float]

llama-bench is built once from the llama-cpp-python sdist (benchmarks/llama_cpp_build.py). Each line gives the load
average before the run.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_build import build  # noqa: E402
from llama_server import llama_bench, pernode_prefill  # noqa: E402

from pernode.serve.models.registry import resolve_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--gemm-inputs", default="int16,float",
                   help="PERNODE_GEMM_INPUT values to run pernode with ('' for the default alone)")
    args = p.parse_args(argv)
    gguf = resolve_model(args.model).path
    build(jobs=2, version=None)
    settings = [s for s in args.gemm_inputs.split(",") if s] or [None]
    rates: dict[str, list[float]] = {"llama-bench pp512": []}
    for r in range(args.rounds):
        peer = llama_bench(gguf, args.threads)
        rates["llama-bench pp512"].append(peer["pp512"])
        print(f"round {r + 1}: llama-bench pp512 {peer['pp512']:.0f} tok/s (load {peer['load']})", flush=True)
        for setting in settings:
            if setting is None:
                os.environ.pop("PERNODE_GEMM_INPUT", None)
            else:
                os.environ["PERNODE_GEMM_INPUT"] = setting
            ours = pernode_prefill(args.model, args.threads, "")
            label = f"pernode prefill 512, GEMM x {setting or 'default'}"
            rates.setdefault(label, []).append(ours["pp512"])
            print(f"round {r + 1}: {label} {ours['pp512']:.0f} tok/s, {ours['pp512'] / peer['pp512']:.2f}x "
                  f"llama-bench (load {ours['load']})", flush=True)
    os.environ.pop("PERNODE_GEMM_INPUT", None)
    peer = statistics.median(rates["llama-bench pp512"])
    print(f"\nmedians over {args.rounds} rounds, {args.threads} threads, {Path(gguf).name}:")
    for label, values in rates.items():
        med = statistics.median(values)
        print(f"  {label}: {med:.0f} tok/s ({', '.join(f'{v:.0f}' for v in values)})"
              + ("" if label.startswith("llama") else f", {med / peer:.2f}x llama-bench pp512"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
