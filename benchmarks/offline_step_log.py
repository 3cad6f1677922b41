"""The mixed offline workload's steps, one line of figures each: how many steps of which kind (prefill chunks
mixed with decodes, pure decode, the small-batch tail) and what each kind costs in wall and CPU time.

The workload is `pernode bench offline`'s (seeded; --num-prompts requests, prompts U[32, 512], outputs U[16, 256],
ignore_eos, all submitted at once). Each engine step is timed (perf_counter, and process CPU time, which counts
both threads) and classified by its scheduled tokens: "mixed" holds a prefill chunk, "decode" only one-token rows,
"tail" is a decode step with fewer than --tail-rows rows. Usage:

    .venv/bin/python benchmarks/offline_step_log.py [--num-prompts 48] [--tail-rows 8] [engine flags]
"""
import argparse
import collections
import statistics
import sys
import time

from pernode.cli.options import add_engine_arguments, engine_config_from_args
from pernode.measure.bench.bench_offline import NUM_SPECIAL_TOKENS
from pernode.measure.bench.offline_throughput import random_workload
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--tail-rows", type=int, default=8)
    add_engine_arguments(p)
    args = p.parse_args(argv)
    engine = LLMEngine(engine_config_from_args(args))
    workload = random_workload(args.num_prompts, engine.model_config.vocab_size, (32, 512), (16, 256), seed=0,
                               avoid_ids=tuple(range(NUM_SPECIAL_TOKENS)))
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    schedule, seen = engine.scheduler.schedule, []

    def recording_schedule():
        batch = schedule()
        seen.append(batch)
        return batch

    engine.scheduler.schedule = recording_schedule
    steps = []  # (kind, rows, tokens, wall s, cpu s)
    started, cpu_started = time.perf_counter(), time.process_time()
    while engine.has_unfinished_requests():
        t0, c0 = time.perf_counter(), time.process_time()
        engine.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        batch = seen[-1] if seen else None
        if not batch:
            continue
        tokens, rows = sum(batch.num_new_tokens), len(batch.num_new_tokens)
        kind = "mixed" if tokens > rows else ("tail" if rows < args.tail_rows else "decode")
        steps.append((kind, rows, tokens, wall, cpu))
    total, total_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{len(steps)} steps, {total:.1f} s wall, {total_cpu:.1f} s CPU, "
          f"{workload.num_output_tokens / total:.1f} output tok/s")
    by_kind = collections.defaultdict(list)
    for s in steps:
        by_kind[s[0]].append(s)
    for kind in ("mixed", "decode", "tail"):
        ss = by_kind[kind]
        if not ss:
            continue
        wall, cpu = sum(s[3] for s in ss), sum(s[4] for s in ss)
        print(f"{kind:6s}: {len(ss):4d} steps, rows median {statistics.median(s[1] for s in ss):.0f} "
              f"(min {min(s[1] for s in ss)}, max {max(s[1] for s in ss)}), tokens {sum(s[2] for s in ss)}, "
              f"wall {wall:.1f} s ({100 * wall / total:.0f}%), CPU {cpu:.1f} s, "
              f"CPU per step {1e3 * cpu / len(ss):.1f} ms")
    decode = [s for s in steps if s[0] != "mixed"]
    for lo, hi in ((1, 8), (8, 16), (16, 24), (24, 32), (32, 48), (48, 65)):
        ss = [s for s in decode if lo <= s[1] < hi]
        if ss:
            print(f"decode rows [{lo}, {hi}): {len(ss)} steps, CPU per step median "
                  f"{1e3 * statistics.median(s[4] for s in ss):.1f} ms, per row "
                  f"{1e3 * sum(s[4] for s in ss) / sum(s[1] for s in ss):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
