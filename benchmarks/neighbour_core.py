"""Does work on the client's core slow a replica's steps on its own core? `fleet validate` puts the replica on core 0
and the load generator (and Ray's other processes) on core 1; the profile is taken with core 1 idle. If the cores
share more than their L3 (SMT siblings on the host, memory bandwidth), the replica steps slower under load than
the profile says, on both TTFT and TPOT alike.

Interleaved rounds on core 0, one torch thread: decode steps at batch 1 and 8 with core 1 left alone (A) and with a
busy loop pinned to core 1 (B); prints B / A per batch and the load average. Meaningful only on a quiet machine:
on a busy one, unpinned neighbours move from core 1 to core 0 when the loop starts, which reads as a slowdown.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/neighbour_core.py [--rounds 6] [--busy python|numpy]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine

BUSY = {"python": "x = 0\nwhile True: x += 1",  # one core's integer pipeline, little memory traffic
        "numpy": "import numpy as np\na = np.random.rand(512, 512)\nwhile True: a @ a"}  # FMA units and L2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context-len", type=int, default=92)
    ap.add_argument("--busy", choices=sorted(BUSY), default="python")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {0})
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", num_threads=1, kv_cache_bytes=256 * 2**20))
    load_before = os.getloadavg()[0]
    times: dict[str, dict[int, list[float]]] = {"alone": {1: [], 8: []}, "busy": {1: [], 8: []}}
    for r in range(args.rounds):
        for arm in (("alone", "busy") if r % 2 == 0 else ("busy", "alone")):
            loop = (subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", BUSY[args.busy]])
                    if arm == "busy" else None)
            time.sleep(0.3)
            try:
                for b in (1, 8):
                    times[arm][b].append(statistics.median(engine.time_decode_steps(b, args.context_len, args.steps)))
            finally:
                if loop is not None:
                    loop.kill()
                    loop.wait()
    for b in (1, 8):
        alone, busy = statistics.median(times["alone"][b]), statistics.median(times["busy"][b])
        print(f"batch {b}: decode step {alone * 1e3:.2f} ms with core 1 alone, {busy * 1e3:.2f} ms with core 1 busy "
              f"({args.busy}): x {busy / alone:.3f} (median of {args.rounds} interleaved rounds)")
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
