"""The report's compilation section: the engine with --compile beside the eager one on the same model, in one run
(compile time, decode step times, and whether greedy tokens agree). Skipped in quick mode: compiling takes
minutes on a small CPU."""
from __future__ import annotations

import dataclasses
import statistics

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams

PROMPT = "The capital of France is"
COMPARE_KV_BYTES = 256 * 2**20


def compare_compiled(config: EngineConfig, eager: LLMEngine, batch_sizes=(1, 8), context: int = 256,
                     steps: int = 8) -> dict:
    """Build a compiled engine beside `eager` and time both, alternating, at each batch size."""
    # its own small KV cache: the comparison needs a few batches, not a second full-size cache
    compiled = LLMEngine(dataclasses.replace(config, compile=True, num_blocks=None, kv_cache_bytes=COMPARE_KV_BYTES))
    params = SamplingParams(temperature=0.0, max_tokens=24)
    want = LLM.from_engine(eager).generate([PROMPT], params)[0].outputs[0].token_ids
    got = LLM.from_engine(compiled).generate([PROMPT], params)[0].outputs[0].token_ids
    rows = []
    for b in batch_sizes:
        times = {}
        for name, engine in (("eager", eager), ("compiled", compiled)):
            measured = engine.time_decode_steps(b, context, steps)
            times[name] = None if measured is None else statistics.median(measured)
        if None not in times.values():
            rows.append({"batch": b, "eager_ms": 1e3 * times["eager"], "compiled_ms": 1e3 * times["compiled"]})
    return {"compile_time_s": compiled.compile_time_s, "greedy_identical": want == got, "context": context,
            "rows": rows}


def compiled_section(result: dict | None) -> dict:
    if result is None:
        return {"title": "Compilation (--compile)",
                "text": "not measured: skipped in --quick (compiling takes minutes), or the report itself runs with "
                        "--compile; benchmarks/compile.py measures it"}
    return {"title": f"Compilation (--compile): warm-up {result['compile_time_s']:.1f} s, greedy tokens identical to "
                     f"eager: {result['greedy_identical']}; decode steps at context {result['context']}",
            "columns": ["batch", "eager ms/step", "compiled ms/step", "eager / compiled"],
            "rows": [[r["batch"], round(r["eager_ms"], 2), round(r["compiled_ms"], 2),
                      round(r["eager_ms"] / r["compiled_ms"], 2)] for r in result["rows"]]}
