"""How many multiply-adds per second each of this CPU's dot-product instructions issues on one core: 12 independent
accumulator chains of one instruction in an inline-assembly loop (so the compiler can neither fuse nor hoist them),
printed beside the fp32 FMA of the same width. This is the ceiling a GEMM kernel's inner loop is held to: e.g. on
Zen 4, vpdpwssd (int16 pairs) issues the MACs of vdpbf16ps, twice the fp32 FMA's, and vpdpbusd (int8) twice that.

    PYTHONPATH=src python benchmarks/gemm_isa.py [--iterations 20000000]

Built once with torch.utils.cpp_extension (-march=native); instructions the CPU lacks are skipped.
"""
from __future__ import annotations

import argparse

from torch.utils import cpp_extension

from pernode.serve.kernels.cpu_features import cpu_flags

# (name, mnemonic, register width, MACs per instruction, flags it needs)
INSTRUCTIONS = [
    ("fp32 FMA, 256-bit", "vfmadd231ps", "ymm", 8, ("fma",)),
    ("int16 pairs (vpmaddwd, then its add), 256-bit", None, "ymm", 16, ("avx2",)),
    ("int8 pairs (vpmaddubsw), 256-bit", "vpmaddubsw", "ymm", 32, ("avx2",)),
    ("fp32 FMA, 512-bit", "vfmadd231ps", "zmm", 16, ("avx512f",)),
    ("bf16 dot (vdpbf16ps), 512-bit", "vdpbf16ps", "zmm", 32, ("avx512_bf16",)),
    ("int16 dot (vpdpwssd), 512-bit", "vpdpwssd", "zmm", 32, ("avx512_vnni",)),
    ("int8 dot (vpdpbusd), 512-bit", "vpdpbusd", "zmm", 64, ("avx512_vnni",)),
]


def _loop(name: str, body: str, reg: str) -> str:
    clobbers = ", ".join(f'"xmm{i}"' for i in list(range(12)) + [14, 15])
    return f"""
double {name}(int64_t n) {{
  const auto t = std::chrono::steady_clock::now();
  asm volatile("vpxor %%xmm14, %%xmm14, %%xmm14\\n\\tvpxor %%xmm15, %%xmm15, %%xmm15\\n\\t1:\\n\\t"
               {body} "dec %0\\n\\tjnz 1b" : "+r"(n) :: {clobbers}, "cc");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}}"""


def _source(chosen) -> str:
    fns = []
    for i, (_, mnemonic, reg, _, _) in enumerate(chosen):
        if mnemonic is None:  # vpmaddwd has no accumulating form before VNNI: multiply, then add into the chain
            body = " ".join(f'"vpmaddwd %%{reg}14, %%{reg}15, %%{reg}13\\n\\t'
                            f'vpaddd %%{reg}13, %%{reg}{c}, %%{reg}{c}\\n\\t"' for c in range(12))
            fn = _loop(f"isa_{i}", body, reg).replace('"xmm14"', '"xmm13", "xmm14"')
        else:
            body = " ".join(f'"{mnemonic} %%{reg}14, %%{reg}15, %%{reg}{c}\\n\\t"' for c in range(12))
            fn = _loop(f"isa_{i}", body, reg)
        fns.append(fn)
    return "#include <chrono>\n#include <cstdint>\n" + "\n".join(fns)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20_000_000)
    args = p.parse_args(argv)
    flags = cpu_flags()
    chosen = [ins for ins in INSTRUCTIONS if all(f in flags for f in ins[4])]
    if not chosen:
        raise SystemExit("no x86 SIMD dot-product instruction found in /proc/cpuinfo")
    module = cpp_extension.load_inline("pernode_gemm_isa", cpp_sources=_source(chosen),
                                       extra_cflags=["-O2", "-march=native"],
                                       functions=[f"isa_{i}" for i in range(len(chosen))])
    rates = {}
    for i, (label, _, reg, macs, _) in enumerate(chosen):
        getattr(module, f"isa_{i}")(args.iterations // 10)  # warm-up: clocks up, caches the code
        seconds = getattr(module, f"isa_{i}")(args.iterations)
        rates[label] = (12 * args.iterations / seconds / 1e9, 12 * args.iterations * macs / seconds / 1e9, reg)
    for label, (per_ns, gmacs, reg) in rates.items():
        fma = rates.get(f"fp32 FMA, {'512' if reg == 'zmm' else '256'}-bit")
        ratio = f"{gmacs / fma[1]:.2f}x the fp32 FMA's MACs" if fma else ""
        print(f"{label:40s} {per_ns:5.2f} instructions/ns  {gmacs:7.1f} GMAC/s  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
