"""`pernode profile`: measure one node serving one model and place every point on the roofline.

Decode steps are timed over a KV cache filled to the target context with placeholder values: a step's time
depends on the shapes it moves, not on the values, so the batch sweep needs no long prefill per point.
"""
from __future__ import annotations

import logging
import resource
import statistics
import time
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from pernode.measure.profile import profile_schema as schema
from pernode.measure.profile.hardware import measure_peaks
from pernode.measure.profile.roofline import crossover_batch_size, decode_step_cost, dtype_bytes, prefill_cost
from pernode.progress import output_console, progress
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams

log = logging.getLogger("pernode.profile")

# prefill_passes / decode_passes: each prompt length / batch size is timed once per pass, the passes one after
# another, and the median kept
QUICK = dict(batch_sizes=(1, 4, 16, 64), prompt_lens=(64, 256, 1024), context_len=256, decode_steps=4,
             prefill_passes=1, decode_passes=1)
# Every batch size up to 32: the kernels change tiles and paths with the row count, and the step time jumps between
# powers of two (on one AVX-512 CPU, 4 rows took 1.9x as long as 3, and 8 less than 7).
DENSE_BATCH_SIZES = tuple(range(1, 33))
FULL = dict(batch_sizes=DENSE_BATCH_SIZES + (48, 64, 96, 128, 192, 256),
            prompt_lens=(64, 128, 256, 512, 1024, 2048), context_len=512, decode_steps=8, prefill_passes=3,
            decode_passes=3)


def _random_prompt(engine: LLMEngine, n: int, g: torch.Generator) -> list[int]:
    # ids above the special tokens, fresh per call so the prefix cache never hits
    return torch.randint(1000, engine.model_config.vocab_size, (n,), generator=g).tolist()


def time_decode_step_s(engine: LLMEngine, batch_size: int, context_len: int, num_steps: int,
                       g: torch.Generator) -> float | None:
    """Median time of one decode step (forward + sampling) for `batch_size` sequences at `context_len`.
    None when the KV cache cannot hold the batch."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    times = engine.time_decode_steps(batch_size, context_len, num_steps, seed)
    if times is None:
        return None
    return statistics.median(times[1:] if len(times) > 2 else times)  # the first step warms caches


def time_ttft_s(engine: LLMEngine, prompt_len: int, g: torch.Generator) -> float:
    """Time to first token of one fresh prompt on an idle engine, chunked by its token budget as in serving."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(f"ttft-{prompt_len}-{time.monotonic_ns()}", _random_prompt(engine, prompt_len, g), params)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def prefill_medians_s(time_one_s: Callable[[int], float], prompt_lens: Sequence[int], passes: int,
                      after_each: Callable[[], None] = lambda: None) -> dict[int, float]:
    """{prompt length: median TTFT} over `passes` passes, each timing every length once in turn. A prefill is timed
    from one request, so one reading carries whatever the machine was doing then; passes spread a drift in its speed
    over every length alike instead of bending the curve (on a 2-vCPU VM two quiet profiles 15 minutes apart put the
    same prefill 5-14% apart), and the median drops a pass that hit a stall."""
    samples: dict[int, list[float]] = {p: [] for p in prompt_lens}
    for _ in range(max(passes, 1)):
        for p in prompt_lens:
            samples[p].append(time_one_s(p))
            after_each()
    return {p: statistics.median(v) for p, v in samples.items()}


def time_mixed_step_s(engine: LLMEngine, batch_size: int, context_len: int, prompt_tokens: int, num_steps: int,
                      g: torch.Generator) -> float | None:
    """Median time of one step holding `batch_size` decodes at `context_len` and a `prompt_tokens` prompt chunk.
    None when the KV cache cannot hold them."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    times = engine.time_mixed_steps(batch_size, context_len, prompt_tokens, num_steps, seed)
    if times is None:
        return None
    return statistics.median(times[1:] if len(times) > 2 else times)


def mixed_grid(batch_sizes: list[int], prompt_lens: list[int], token_budget: int) -> list[tuple[int, int]]:
    """(decodes, prompt tokens) pairs to measure mixed steps at: up to three batch sizes of the decode sweep spread
    in log space (from 4 up) and up to two prompt chunks, each step within the engine's token budget."""
    bs = sorted(b for b in batch_sizes if b >= 4)
    if len(bs) > 3:
        bs = [bs[0], bs[len(bs) // 2], bs[-1]]
    ps = sorted({min(p, 256) for p in prompt_lens if p >= 32})
    ps = [ps[0], ps[-1]] if len(ps) > 1 else ps
    return [(b, p) for b in bs for p in ps if b + p <= token_budget]


def memory_high_water_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def decode_medians_s(time_one_s: Callable[[int], float | None], batch_sizes: Sequence[int], passes: int,
                     max_step_s: float, after_each: Callable[[], None] = lambda: None) -> dict[int, float]:
    """{batch size: median decode step} over `passes` passes, each timing every batch size once in turn, as
    prefill_medians_s does for prompts: one pass through the sizes takes seconds to minutes, and a node whose speed
    drifts meanwhile bends the curve (on a 2-core host one pass caught batch 3 at 13.1 ms, as fast as batch 2, and a
    run at low load then measured its 3-sequence steps at 1.41x the model against 0.93x at batch 1). The first pass stops at the first batch size the KV cache
    cannot hold (None) or whose step takes longer than `max_step_s`, and later passes time the sizes it kept."""
    samples: dict[int, list[float]] = {}
    for b in batch_sizes:
        step_s = time_one_s(b)
        after_each()
        if step_s is None:
            log.info("batch %d does not fit the KV cache: sweep stops", b)
            break
        samples[b] = [step_s]
        if step_s > max_step_s:
            log.info("batch %d takes %.2f s per step (cap %.1f s): sweep stops", b, step_s, max_step_s)
            break
    for _ in range(max(passes, 1) - 1):
        for b, got in samples.items():
            step_s = time_one_s(b)
            after_each()
            if step_s is not None:
                got.append(step_s)
    return {b: statistics.median(v) for b, v in samples.items()}


def run_profile(engine: LLMEngine, quick: bool = False, hardware: schema.HardwareSection | None = None, seed: int = 0,
                batch_sizes=None, prompt_lens=None, context_len: int | None = None,
                max_step_s: float = 5.0, prefill_passes: int | None = None,
                decode_passes: int | None = None) -> schema.Profile:
    """Measure the node and return a validated profile dict (docs/profile_schema.md)."""
    plan = dict(QUICK if quick else FULL)
    if batch_sizes:
        plan["batch_sizes"] = tuple(batch_sizes)
    if prompt_lens:
        plan["prompt_lens"] = tuple(prompt_lens)
    if context_len:
        plan["context_len"] = context_len
    if prefill_passes is not None:
        if prefill_passes < 1:
            raise ValueError(f"prefill_passes={prefill_passes}: allowed >= 1")
        plan["prefill_passes"] = prefill_passes
    if decode_passes is not None:
        if decode_passes < 1:
            raise ValueError(f"decode_passes={decode_passes}: allowed >= 1")
        plan["decode_passes"] = decode_passes
    g = torch.Generator().manual_seed(seed)
    dtype = str(engine.dtype).removeprefix("torch.")
    cfg = engine.model_config
    hardware = hardware or measure_peaks(str(engine.device), quick=quick)
    # a quantized KV cache moves its values and their scales: bytes per element from the engine's own count
    kv_dtype = dtype if engine.kv_cache_dtype == "auto" else engine.kv_cache_dtype
    wbytes, kvbytes = dtype_bytes(dtype), engine.kv_bytes_per_token / cfg.kv_bytes_per_token(1)
    ctx = min(plan["context_len"], engine.max_model_len - plan["decode_steps"] - 1)
    prompt_lens = [p for p in plan["prompt_lens"] if p < engine.max_model_len]

    decode, prefill, mixed = [], [], []
    with progress(transient=True) as bar:
        passes = max(int(plan["decode_passes"]), 1)
        task = bar.add_task("decode: TPOT vs batch", total=len(plan["batch_sizes"]) * passes)
        for b, step_s in decode_medians_s(lambda n: time_decode_step_s(engine, n, ctx, plan["decode_steps"], g),
                                          plan["batch_sizes"], passes, max_step_s, lambda: bar.advance(task)).items():
            decode.append(schema.decode_point(b, ctx, step_s, decode_step_cost(cfg, [ctx] * b, wbytes, kvbytes),
                                              hardware, dtype))
        passes = max(int(plan["prefill_passes"]), 1)
        task = bar.add_task("prefill: TTFT vs prompt length", total=len(prompt_lens) * passes)
        time_ttft_s(engine, 16, g)  # warm-up
        for p, ttft in prefill_medians_s(lambda n: time_ttft_s(engine, n, g), prompt_lens, passes,
                                         lambda: bar.advance(task)).items():
            prefill.append(schema.prefill_point(p, ttft, prefill_cost(cfg, p, wbytes, kvbytes), hardware, dtype))
        # Steps that mix decodes with a prompt chunk, as chunked prefill runs them under load: the planner scales
        # its additive estimate (decode step + prompt tokens at the prefill rate) by what these measure.
        grid = mixed_grid([d["batch_size"] for d in decode], prompt_lens, engine.scheduler.config.max_num_batched_tokens)
        task = bar.add_task("mixed: decodes + a prompt chunk in one step", total=len(grid))
        for b, p in grid:
            step_s = time_mixed_step_s(engine, b, ctx, p, 3, g)
            if step_s is not None:
                mixed.append(schema.mixed_point(b, ctx, p, step_s))
            bar.advance(task)

    peak, _ = schema.peak_flops_for(hardware, dtype)
    model = schema.model_section(cfg, dtype, kv_dtype)
    model["kv_bytes_per_token"] = engine.kv_bytes_per_token
    model["max_model_len"] = engine.max_model_len
    kv_section = schema.kv_cache_section(engine.kv_cache_bytes, engine.block_size, engine.kv_bytes_per_token,
                                         engine.max_model_len)
    return schema.make_profile(
        model, hardware, kv_section, decode, prefill,
        crossover_batch_size=crossover_batch_size(cfg, ctx, hardware["peak_bandwidth_gbs"], peak, wbytes, kvbytes),
        memory_high_water_bytes=memory_high_water_bytes(engine.device), mixed=mixed)


def print_profile(profile: schema.Profile, console: Console | None = None) -> None:
    console = console or output_console()
    m, hw, kv = profile["model"], profile["hardware"], profile["kv_cache"]
    console.print(f"[bold]{m['name']}[/bold] {m['dtype']}: {m['num_params'] / 1e6:.1f} M params, "
                  f"{m['weight_bytes'] / 2**20:.0f} MiB weights, {m['kv_bytes_per_token']} KV bytes/token")
    console.print(f"KV cache {kv['kv_cache_bytes'] / 2**30:.2f} GiB = {kv['max_tokens']} tokens: "
                  f"{kv['max_concurrent_seqs']} concurrent sequences of {kv['context_len']} tokens")
    console.print(f"hardware {hw['name']}: {hw['peak_bandwidth_gbs']:.1f} GB/s, "
                  + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in hw["peak_flops"].items() if v))
    t = Table(title="decode: TPOT and throughput vs batch")
    for col in ("batch", "context", "TPOT ms", "tok/s", "GB/s", "GFLOP/s", "intensity", "% of peak", "bound"):
        t.add_column(col, justify="right")
    for p in profile["decode"]:
        t.add_row(str(p["batch_size"]), str(p["context_len"]), f"{p['step_s'] * 1e3:.1f}",
                  f"{p['output_tokens_per_s']:.1f}", f"{p['achieved_gbs']:.2f}", f"{p['achieved_flops'] / 1e9:.1f}",
                  f"{p['arithmetic_intensity']:.1f}", f"{p['fraction_of_peak'] * 100:.0f}%", p["bound"])
    console.print(t)
    t = Table(title="prefill: TTFT vs prompt length")
    for col in ("prompt", "TTFT ms", "tok/s", "GFLOP/s", "% of peak", "bound"):
        t.add_column(col, justify="right")
    for p in profile["prefill"]:
        t.add_row(str(p["prompt_len"]), f"{p['ttft_s'] * 1e3:.0f}", f"{p['prefill_tokens_per_s']:.0f}",
                  f"{p['achieved_flops'] / 1e9:.1f}", f"{p['fraction_of_peak'] * 100:.0f}%", p["bound"])
    console.print(t)
    if profile.get("crossover_batch_size"):
        console.print(f"memory-bound below batch {profile['crossover_batch_size']}, compute-bound above "
                      "(at the profiled context)")
    if profile.get("mixed"):
        decode = {d["batch_size"]: d["step_s"] for d in profile["decode"]}
        rate = {p["prompt_len"]: p["prefill_tokens_per_s"] for p in profile["prefill"]}
        cells = []
        for m in profile["mixed"]:
            # against the additive estimate, from the nearest measured prefill length
            near = min(rate, key=lambda n: abs(n - m["prompt_tokens"]))
            additive = decode.get(m["batch_size"], float("nan")) + m["prompt_tokens"] / rate[near]
            cells.append(f"{m['batch_size']}+{m['prompt_tokens']}: {m['step_s'] * 1e3:.0f} ms "
                         f"({m['step_s'] / additive:.2f}x additive)")
        console.print("mixed steps (decodes + prompt tokens): " + ", ".join(cells))
