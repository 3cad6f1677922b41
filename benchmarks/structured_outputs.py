"""Structured-output overhead: batch-32 generation under a JSON schema against the same batch unconstrained, in one
run, on the default model (SmolLM2-135M-Instruct Q4_1), plus llguidance against outlines-core on the same schema.

Each round runs the same 32 chat prompts twice, unconstrained (ignore_eos: exactly --max-tokens each) and under
the schema (a sample ends when its JSON is complete), alternating, and reports for each: output tokens/s, the mean
engine step time of the steps that run all 32 samples (what the mask costs per step, free of the batch shrinking at
the end), and for the constrained run the time spent computing masks on the worker thread against the time the
step waited for them. Every constrained output is parsed and validated with `jsonschema`.

    .venv/bin/python benchmarks/structured_outputs.py [--batch 32] [--max-tokens 96] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jsonschema

from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.structured.spec import StructuredOutputs
from pernode.serve.sampling.structured.token_table import token_bytes_table

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "skills"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 24},
                         "skills": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 16}}}}


class Timing:
    """Engine step times, and mask compute/wait times, gathered by wrapping the engine's own calls."""

    def __init__(self, engine):
        self.steps: list[tuple[int, float]] = []  # (sequences in the step, seconds)
        self.mask_compute_s = 0.0
        self.mask_wait_s = 0.0
        real_step, real_start = engine.step, engine.structured_outputs.start_masks
        timing = self

        def step():
            n = len(engine.scheduler.running) + len(engine.scheduler.waiting)
            t = time.perf_counter()
            out = real_step()
            timing.steps.append((n, time.perf_counter() - t))
            return out

        class WaitTimed:
            def __init__(self, future):
                self.future = future

            def result(self):
                t = time.perf_counter()
                masks = self.future.result()
                timing.mask_wait_s += time.perf_counter() - t
                return masks

        def start_masks(batch):
            future = real_start(batch)
            if future is None:
                return None
            submitted = time.perf_counter()
            future.add_done_callback(lambda f: setattr(timing, "mask_compute_s",
                                                       timing.mask_compute_s + time.perf_counter() - submitted))
            return WaitTimed(future)

        engine.step, engine.structured_outputs.start_masks = step, start_masks


def run(llm: LLM, prompts: list[str], params: SamplingParams, batch: int) -> dict:
    timing = Timing(llm.engine)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    llm.engine.step = type(llm.engine).step.__get__(llm.engine)  # unwrap
    llm.engine.structured_outputs.start_masks = type(llm.engine.structured_outputs).start_masks.__get__(
        llm.engine.structured_outputs)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    full = [s for n, s in timing.steps if n == batch][1:]  # skip the prefill step
    return {"outputs": outs, "tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "full_step_ms": 1e3 * statistics.mean(full) if full else float("nan"), "full_steps": len(full),
            "mask_compute_s": timing.mask_compute_s, "mask_wait_s": timing.mask_wait_s}


def compare_engines(tokenizer) -> list[str]:
    """Compile time and mean per-token mask time of llguidance and outlines-core on SCHEMA's JSON text."""
    from importlib.metadata import version

    from pernode.serve.sampling.structured.grammar import GrammarCompiler

    text = json.dumps({"name": "Ada Lovelace", "age": 36, "city": "London", "skills": ["math", "poetry"]})
    ids = tokenizer.encode(text, add_special_tokens=False)
    lines = []
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id])
    compiler.ll_tokenizer  # built once per engine; not part of a request
    t = time.perf_counter()
    matcher = compiler.matcher(StructuredOutputs(json=SCHEMA))
    compile_ms = 1e3 * (time.perf_counter() - t)
    t = time.perf_counter()
    for tok in ids:
        matcher.ll.compute_bitmask()
        assert matcher.accept_token(tok)
    lines.append(f"llguidance {version('llguidance')}: compile {compile_ms:.1f} ms, mask {1e3 * (time.perf_counter() - t) / len(ids):.3f} ms/token")

    try:
        import outlines_core  # optional: only this comparison uses it (pip install outlines-core)
    except ImportError:
        return lines + ["outlines-core: not installed (pip install outlines-core), comparison skipped"]
    table = token_bytes_table(tokenizer)
    vocab: dict[bytes, list[int]] = {}
    for i, raw in enumerate(table):
        if i != tokenizer.eos_token_id and not raw.startswith(b"\xff"):
            vocab.setdefault(raw, []).append(i)
    try:
        vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, vocab)
    except TypeError:  # versions that key the vocabulary by text
        vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id,
                                              {k.decode("utf-8", "replace"): v for k, v in vocab.items()})
    t = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
    compile_ms = 1e3 * (time.perf_counter() - t)
    t = time.perf_counter()
    for tok in ids:
        guide.get_tokens()
        guide.advance(tok)
    lines.append(f"outlines-core {version('outlines-core')}: compile {compile_ms:.1f} ms, mask {1e3 * (time.perf_counter() - t) / len(ids):.3f} "
                 f"ms/token (token ids only; our bitmask unpacking not included)")
    for name in ("any JSON object ({\"type\": \"object\"})", "Lark grammar"):
        lines.append(f"  {name}: llguidance yes; outlines-core no (regex only, nothing recursive)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}", flush=True)
    llm = LLM(args.model) if args.model else LLM()
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Invent person number {i}: name, age, city and "
                                                                     f"skills, as JSON."}])
               for i in range(args.batch)]
    free = SamplingParams(temperature=0.7, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.7, seed=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputs(json=SCHEMA))
    run(llm, prompts[:4], constrained, 4)  # warm-up: kernels, the grammar tokenizer, the mask thread
    rows = {"unconstrained": [], "json schema": []}
    for _ in range(args.rounds):
        rows["unconstrained"].append(run(llm, prompts, free, args.batch))
        result = run(llm, prompts, constrained, args.batch)
        valid = 0
        for o in result["outputs"]:
            for c in o.outputs:
                if c.finish_reason == "stop":
                    jsonschema.validate(json.loads(c.text), SCHEMA)
                    valid += 1
        result["valid"] = valid
        rows["json schema"].append(result)
    print(f"\nbatch {args.batch}, max_tokens {args.max_tokens}, {args.rounds} rounds (medians), "
          f"load average after: {os.getloadavg()}")
    print("| run | output tok/s | tokens | step ms (all 32 running) | mask compute s | mask wait s | valid JSON |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    med = {}
    for name, results in rows.items():
        m = {k: statistics.median(r[k] for r in results) for k in ("tok_s", "tokens", "full_step_ms",
                                                                      "mask_compute_s", "mask_wait_s")}
        med[name] = m
        valid = f"{min(r['valid'] for r in results)}/{args.batch}" if name == "json schema" else "-"
        print(f"| {name} | {m['tok_s']:.1f} | {m['tokens']:.0f} | {m['full_step_ms']:.1f} | "
              f"{m['mask_compute_s']:.2f} | {m['mask_wait_s']:.3f} | {valid} |")
    ratio = med["json schema"]["tok_s"] / med["unconstrained"]["tok_s"]
    step_ratio = med["json schema"]["full_step_ms"] / med["unconstrained"]["full_step_ms"]
    print(f"\nconstrained / unconstrained: output tok/s x{ratio:.3f}, full-batch step time x{step_ratio:.3f}")
    print("\n".join(compare_engines(tok)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
