"""Speculative decoding measured: batch-1 latency and throughput with and without it, for each proposer, on a chat
workload and an input-grounded one (rewrite this stdlib function), with acceptance numbers; and throughput at a
concurrency, speculation on vs off. Every figure is a ratio to the same engine without speculation, in one run.

Speculative decoding: Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass

from pernode.config import EngineConfig, SpeculativeConfig
from pernode.measure.bench.datasets import CHAT_MIX
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.sampling.params import SamplingParams

log = logging.getLogger("pernode.speculative")

# Functions from the standard library (on every machine; provenance: CPython's own source) to be rewritten: an
# input-grounded task whose answer copies most of its prompt.
GROUNDED_SOURCES = (textwrap.dedent, textwrap.indent, json.dumps, inspect.cleandoc, dataclasses.astuple,
                    logging.getLevelName)


def chat_prompts(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": CHAT_MIX[i % len(CHAT_MIX)][0]}] for i in range(count)]


def grounded_prompts(count: int, max_lines: int = 24) -> list[list[dict]]:
    out = []
    for i in range(count):
        source = "\n".join(inspect.getsource(GROUNDED_SOURCES[i % len(GROUNDED_SOURCES)]).splitlines()[:max_lines])
        out.append([{"role": "user", "content": "Repeat this Python code exactly, renaming the function to "
                                                f"`patched`:\n```python\n{source}\n```"}])
    return out


WORKLOADS = {"chat": chat_prompts, "grounded": grounded_prompts}


@dataclass
class SpeculationRow:
    proposer: str  # "off", "ngram", "draft"
    workload: str  # "chat", "grounded", "mixed@32"
    concurrency: int
    num_requests: int
    output_tokens: int
    elapsed_s: float
    tpot_ms: float  # mean time per output token after the first, per request
    latency_s: float  # mean arrival-to-last-token per request
    acceptance_rate: float | None = None
    mean_acceptance_length: float | None = None
    speedup_tpot: float | None = None  # TPOT without speculation / TPOT with (same workload, same run)
    speedup_throughput: float | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "output_tokens_per_s": self.output_tokens_per_s}


def _run(llm: LLM, conversations: list[list[dict]], max_tokens: int, concurrency: int) -> tuple[int, float, list]:
    """Greedy answers, `concurrency` requests at a time; output tokens, seconds, outputs."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    started, outs = time.perf_counter(), []
    for i in range(0, len(conversations), concurrency):
        outs += llm.chat(conversations[i:i + concurrency], params)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outs), elapsed, outs


def _row(proposer: str, workload: str, concurrency: int, engine: LLMEngine, before, outs, tokens: int,
         elapsed: float) -> SpeculationRow:
    tpots, latencies = [], []
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if m and m.finished_s is not None and m.first_token_s is not None and n > 1:
            tpots.append((m.finished_s - m.first_token_s) / (n - 1))
            latencies.append(m.finished_s - m.arrival_s)
    row = SpeculationRow(proposer, workload, concurrency, len(outs), tokens, elapsed,
                         1e3 * sum(tpots) / max(len(tpots), 1), sum(latencies) / max(len(latencies), 1))
    after = engine.stats().spec_decode
    if after is not None:
        proposed = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        drafts = after.num_drafts - before.num_drafts
        row.acceptance_rate = accepted / proposed if proposed else 0.0
        row.mean_acceptance_length = 1 + accepted / drafts if drafts else 0.0
    return row


def measure_speculation(config: EngineConfig, proposers: dict[str, SpeculativeConfig | None], num_prompts: int = 4,
                        max_tokens: int = 64, concurrency: int = 1, workloads: tuple[str, ...] = ("chat", "grounded"),
                        progress=None) -> list[SpeculationRow]:
    """For each proposer (None: speculation off, measured first) an engine of `config`, each workload's prompts
    answered `concurrency` at a time; rows with speedups against "off" on the same workload."""
    rows: list[SpeculationRow] = []
    conversations = {w: WORKLOADS[w](num_prompts) if w in WORKLOADS else
                     [c for pair in zip(chat_prompts(num_prompts), grounded_prompts(num_prompts)) for c in pair]
                     for w in workloads}
    for name, spec in proposers.items():
        engine = LLMEngine(dataclasses.replace(config, speculative=spec))
        llm = LLM.from_engine(engine)
        llm.chat(chat_prompts(1), SamplingParams(temperature=0.0, max_tokens=8))  # warm-up: kernels, step costs
        for workload, convs in conversations.items():
            before = engine.stats().spec_decode
            tokens, elapsed, outs = _run(llm, convs, max_tokens, concurrency)
            row = _row(name, workload if concurrency == 1 else f"{workload}@{concurrency}", concurrency, engine,
                       before, outs, tokens, elapsed)
            rows.append(row)
            if progress:
                progress(row)
            else:
                print(f"  {name:6s} {row.workload:10s} TPOT {row.tpot_ms:7.1f} ms, {row.output_tokens_per_s:6.1f} "
                      f"tok/s" + (f", acceptance {row.acceptance_rate:.2f}" if row.acceptance_rate is not None
                                  else ""), file=sys.stderr, flush=True)
    base = {r.workload: r for r in rows if r.proposer == "off"}
    for r in rows:
        b = base.get(r.workload)
        if b is not None:
            r.speedup_tpot = b.tpot_ms / r.tpot_ms if r.tpot_ms else None
            r.speedup_throughput = r.output_tokens_per_s / b.output_tokens_per_s if b.output_tokens_per_s else None
    return rows


def speculation_section(rows: list[SpeculationRow]) -> dict:
    """The report's table."""
    def r2(v):
        return None if v is None else round(v, 2)

    return {"title": "Speculative decoding: batch-1 TPOT and throughput with and without it (greedy, same engine, "
                     "same run; × = without / with)",
            "columns": ["proposer", "workload", "requests", "output tokens", "TPOT ms", "× TPOT", "tok/s",
                        "× tok/s", "mean latency s", "acceptance", "mean accepted length"],
            "rows": [[r.proposer, r.workload, r.num_requests, r.output_tokens, round(r.tpot_ms, 1),
                      r2(r.speedup_tpot), round(r.output_tokens_per_s, 1), r2(r.speedup_throughput),
                      round(r.latency_s, 2), r2(r.acceptance_rate), r2(r.mean_acceptance_length)] for r in rows]}
