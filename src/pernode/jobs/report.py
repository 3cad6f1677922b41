"""`pernode report`: the main job. Load the model, show it answering, profile the node, measure offline
throughput, shrink the model (quantized checkpoints with their perplexity and decode speed), plan a fleet from the
profile, and write everything into one HTML report."""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import os
import time

import torch

from pernode.config import EngineConfig, SpeculativeConfig
from pernode.jobs.compare_compiled import compare_compiled, compiled_section
from pernode.jobs.compare_quantized import build_and_score, measure_speeds
from pernode.jobs.distillation import distillation_report
from pernode.jobs.frontier import (QUICK_VARIANTS, FrontierSettings, default_variant_names, frontier_rows, run_frontier,
                                   variants_named)
from pernode.jobs.precision_quality import measure_precision_quality, precision_section
from pernode.jobs.speculative import measure_speculation, speculation_section
from pernode.measure.bench.bench_offline import print_results, run_hf_best
from pernode.measure.bench.offline_throughput import random_workload, run_pernode
from pernode.measure.profile.profile_schema import save_profile
from pernode.measure.profile.profiler import print_profile, run_profile
from pernode.measure.report_html import frontier_chart_png, quantization_chart_png, write_report_html
from pernode.price.frontier import Frontier
from pernode.price.planner import Plan, plan
from pernode.price.report import plot_plan, render_plan
from pernode.progress import output_console
from pernode.slo import SLO
from pernode.price.workload import LengthDist, Workload
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.llm import LLM
from pernode.serve.models.registry import resolve_model
from pernode.serve.sampling.params import SamplingParams
from pernode.shrink.recipes import recipes_named

log = logging.getLogger("pernode.report")

DEFAULT_WORKLOAD = dict(rate_rps=2.0, input_len=(128, 512), output_len=(64, 256))
DEFAULT_SLO = "ttft_ms=2000,tpot_ms=200"
# Quantized checkpoints the report builds (quick: GPTQ on 8 calibration windows instead of 16)
QUICK_QUANT = recipes_named(["fp32", "rtn-int8", "rtn-int4-g64", "gptq-int4-g64+lm8", "wanda-50"])
FULL_QUANT = recipes_named(["fp32", "rtn-int8", "rtn-int4-g64", "gptq-int4-g64", "awq-int4-g64", "awq-int4-g64+lm8",
                            "smoothquant-w8a8", "sparsegpt-50", "sparsegpt-2:4", "sparsegpt-50+gptq-int4-g64"])


def run_report(config: EngineConfig, out_dir: str = "pernode-report", quick: bool = False) -> int:
    console = output_console()
    os.makedirs(out_dir, exist_ok=True)
    if config.max_model_len is None:  # the profile's context range; the model's 8k would only shrink the batch
        config = dataclasses.replace(config, max_model_len=2048)
    started = time.perf_counter()
    llm = LLM.from_engine(LLMEngine(config))
    engine = llm.engine

    console.rule("[bold]1. the model answers")
    question = "What is the capital of France, and why is it famous?"
    answer = llm.chat([{"role": "user", "content": question}], SamplingParams(temperature=0.0, max_tokens=64))[0]
    console.print(f"[dim]user:[/dim] {question}\n[dim]model:[/dim] {answer.outputs[0].text}")

    console.rule("[bold]2. the per-node profile")
    profile = run_profile(engine, quick=quick)
    save_profile(os.path.join(out_dir, "profile.json"), profile)
    print_profile(profile, console)

    console.rule("[bold]3. offline throughput")
    n = 32 if quick else 128
    workload = random_workload(n, engine.model_config.vocab_size, (32, 256 if quick else 512),
                               (16, 128 if quick else 256), seed=0, avoid_ids=tuple(range(17)))
    results = [run_pernode(llm, workload)]
    if not quick:  # the peer on the same workload, in the same run
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        results.append(run_hf_best(resolve_model(config.model), workload, [8, 16, 32], 32, pad))
        print_results(results, console)
    tput = results[0]
    console.print(f"{tput.num_requests} requests ({tput.prompt_tokens} prompt + {tput.output_tokens} output tokens) "
                  f"in {tput.elapsed_s:.1f} s: [bold]{tput.output_tokens_per_s:.1f} output tok/s[/bold], "
                  f"{tput.requests_per_s:.2f} req/s")

    console.rule("[bold]3b. speculative decoding at batch 1")
    spec_rows = _speculation(config, quick)

    compiled = None if quick or config.compile else compare_compiled(config, engine)
    if compiled is not None:
        console.print(compiled_section(compiled)["title"], compiled["rows"])

    console.rule("[bold]4. shrinking the model")
    precision_rows = measure_precision_quality(
        config.model, windows=2 if quick else 4,
        progress=lambda r: console.print(f"  {r.dtype}, GGUF weights {r.gguf_weights}: ppl {r.perplexity:.4f}"))
    quant_rows = _quantization(config.model, out_dir, quick, console)
    distill_section = distillation_report(config.model, out_dir, console.print)

    console.rule("[bold]5. the fleet for a default workload")
    wl = Workload(DEFAULT_WORKLOAD["rate_rps"], LengthDist.uniform(*DEFAULT_WORKLOAD["input_len"]),
                  LengthDist.uniform(*DEFAULT_WORKLOAD["output_len"]))
    fleet = plan(profile, wl, SLO.parse(DEFAULT_SLO), instance="aws-c7i.large", num_requests=1000 if quick else 4000,
                 interval_seeds=1 if quick else 5)
    render_plan(fleet, console)
    plot_plan(fleet, os.path.join(out_dir, "plan.png"))
    fleet.save(os.path.join(out_dir, "plan.json"))

    console.rule("[bold]6. the cost frontier: every variant priced for the same workload")
    frontier = _frontier(config, out_dir, quick, wl, console)

    sections = [
        {"title": "The model answers", "text": f"user: {question}\nmodel: {answer.outputs[0].text}"},
        {"title": "Offline throughput (all requests submitted at once, same seeded workload for every system)",
         "columns": ["system", "requests", "prompt tokens", "output tokens", "elapsed s", "output tok/s", "req/s",
                     "pernode ×"],
         "rows": [[r.system, r.num_requests, r.prompt_tokens, r.output_tokens, round(r.elapsed_s, 1),
                   round(r.output_tokens_per_s, 1), round(r.requests_per_s, 2),
                   round(tput.output_tokens_per_s / r.output_tokens_per_s, 2)] for r in results]},
        precision_section(precision_rows),
        speculation_section(spec_rows),
        _quantization_section(quant_rows),
        distill_section,
        compiled_section(compiled),
        _plan_section(fleet, DEFAULT_SLO),
        _frontier_section(frontier),
    ]
    path = write_report_html(os.path.join(out_dir, "report.html"), profile, extra_sections=sections,
                             title=f"pernode report: {engine.model_config.name} on {profile['hardware']['name']}")
    console.print(f"\n[bold green]report written:[/bold green] {path} "
                  f"(profile.json, plan.json, plan.png beside it; {time.perf_counter() - started:.0f} s)")
    return 0


def _quantization(model: str, out_dir: str, quick: bool, console) -> list[dict]:
    """Quantized checkpoints of the served model under out/checkpoints, each re-loaded, scored and timed."""
    recipes = QUICK_QUANT if quick else FULL_QUANT
    windows = 2 if quick else 4
    rows = build_and_score(model, recipes, os.path.join(out_dir, "checkpoints"), seq_len=512, windows=windows,
                           calib_windows=8 if quick else 16, decode_path_ppl=False,
                           progress=lambda r: console.print(f"  {r['name']}: {r['checkpoint_mb']:.0f} MB, "
                                                            f"ppl {r['ppl']:.3f}"))
    measure_speeds(rows, steps1=16, steps64=None if quick else 2, rounds=1 if quick else 2,
                   threads=torch.get_num_threads())
    base = rows[0]
    for r in rows:
        console.print(f"  {r['name']:20s} {r['checkpoint_mb']:6.0f} MB  ppl {r['ppl']:8.3f} "
                      f"({100 * (r['ppl'] / base['ppl'] - 1):+6.2f}%)  batch-1 decode {r['decode_b1_tok_s']:6.1f} "
                      f"tok/s ({r['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f}x)")
    return rows


def _speculation(config: EngineConfig, quick: bool) -> list:
    """Batch-1 TPOT without speculation, with prompt lookup, and with the draft model or EAGLE head of
    --speculative if any."""
    proposers = {"off": None, "ngram": SpeculativeConfig("ngram")}
    if config.speculative is not None and config.speculative.method in ("draft", "eagle"):
        proposers[config.speculative.method] = config.speculative
    return measure_speculation(dataclasses.replace(config, speculative=None), proposers,
                               num_prompts=1 if quick else 4, max_tokens=32 if quick else 64)


def _quantization_section(rows: list[dict]) -> dict:
    base = rows[0]
    ppl_windows = base["ppl_tokens"]
    return {"title": "Shrinking the model: quantized and pruned checkpoints as served (perplexity on held-out pydoc text, "
                     f"{ppl_windows} predictions; decode by direct forwards)",
            "columns": ["config", "weights", "checkpoint MB", "perplexity", "Δ ppl", "batch-1 tok/s", "× fp32",
                        "weights read/token MB", "batch-64 tok/s"],
            "rows": [[r["name"], r["scheme"], round(r["checkpoint_mb"]), round(r["ppl"], 3),
                      f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%", round(r["decode_b1_tok_s"], 1),
                      round(r["decode_b1_tok_s"] / base["decode_b1_tok_s"], 2), round(r["weight_mb_per_token"]),
                      None if r.get("decode_b64_tok_s") is None else round(r["decode_b64_tok_s"])] for r in rows],
            "html": quantization_chart_png(rows)}


def _plan_section(fleet: Plan, slo_text: str) -> dict:
    def p99_ms(kind):
        v = (fleet.latency_s.get(kind) or {}).get("p99")
        return None if v is None or math.isnan(v) else round(v * 1e3, 1)

    return {"title": f"Fleet plan: {fleet.workload.describe()} at {fleet.workload.rate_rps} req/s, SLO {slo_text}",
            "columns": ["replicas", "max batch", "utilisation", "TTFT p99 ms", "TPOT p99 ms", "attainment",
                        "$/hour", "$/month", "$/M output tokens"],
            "rows": [[fleet.replicas, fleet.max_batch.batch_size, _round(fleet.utilisation, 3), p99_ms("ttft"),
                      p99_ms("tpot"), _round(fleet.attainment, 4), _round(fleet.cost_per_hour_usd, 3),
                      _round(fleet.cost_per_month_usd, 0), _round(fleet.cost_per_million_output_tokens_usd, 3)]]}


def _round(v, digits):
    return None if v is None else round(v, digits)


def _frontier(config: EngineConfig, out_dir: str, quick: bool, workload: Workload, console) -> Frontier:
    """The variants (quick: three, short profiles) profiled and planned; checkpoints from section 4 are reused."""
    variants = variants_named(list(QUICK_VARIANTS) if quick else default_variant_names())
    settings = FrontierSettings.quick(device=config.device) if quick else FrontierSettings(device=config.device)
    frontier, _ = run_frontier(config.model, variants, workload, SLO.parse(DEFAULT_SLO), instance="aws-c7i.large",
                               settings=settings, checkpoints_dir=os.path.join(out_dir, "checkpoints"),
                               progress=console.print)
    with open(os.path.join(out_dir, "frontier.json"), "w") as f:
        json.dump(frontier.to_dict(), f, indent=1)
    choice = frontier.cheapest_within(0.05)
    console.print(f"frontier: {', '.join(p.name for p in frontier.frontier)}; cheapest within 5% perplexity: "
                  f"{choice.name if choice else 'none'}")
    return frontier


def _frontier_section(frontier: Frontier) -> dict:
    choice = frontier.cheapest_within(0.05)
    points = sorted(frontier.points, key=lambda p: (p.cost, p.perplexity))
    return {"title": f"The cost frontier: {frontier.workload}, SLO {frontier.slo}, {frontier.price}",
            "columns": ["variant", "what", "perplexity", "Δ ppl", "KV bytes/token", "max batch", "replicas",
                        "$/month", "$/M output tokens", "on the frontier"],
            "rows": [[p.name, p.description, round(p.perplexity, 3), f"{100 * p.ppl_increase:+.2f}%",
                      p.kv_bytes_per_token, p.max_batch, p.replicas if p.feasible else "none",
                      _round(p.cost_per_month_usd, 0), _round(p.cost_per_million_output_tokens_usd, 3),
                      "yes" if p.on_frontier else ""] for p in points],
            "html": frontier_chart_png(frontier_rows(frontier))
            + f"<p>Cheapest within 5% perplexity: <b>{choice.name if choice else 'none'}</b>.</p>"
            + "".join(f"<p class='muted'>{html.escape(n)}</p>" for n in frontier.notes)}
