"""`pernode frontier`: every variant of a model the project can make, each profiled on this node, planned for the
same workload and SLO, and set beside its perplexity increase: which checkpoint is cheapest at a quality bar.

A variant is one line in VARIANTS: a name, what it is, and how to make it (a shrink recipe, engine settings such as
the dtype or the KV cache's, or a function that writes a checkpoint). Each variant is served by the engine exactly
as `pernode serve` would, its perplexity measured on that engine's model by the fixed protocol
(shrink/evaluate/perplexity.py, with its KV cache dtype), its node profiled (`measure/profile`), its fleet planned
(`price/planner.py`); price/frontier.py does the Pareto math.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from pernode.config import EngineConfig
from pernode.records import check_range
from pernode.measure.profile.hardware import measure_peaks
from pernode.measure.profile.profile_schema import HardwareSection, Profile
from pernode.measure.profile.profile_median import median_profile
from pernode.measure.profile.profiler import run_profile
from pernode.measure.profile.projection import project_profile
from pernode.price.frontier import Frontier, FrontierPoint, point_from_plan
from pernode.price.planner import plan
from pernode.price.pricing import resolve_price
from pernode.price.workload import Workload
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.jobs.frontier_variants import checkpoint_at, structured_pruned
from pernode.shrink.checkpoint import save_checkpoint
from pernode.shrink.evaluate.perplexity import calibration_windows, evaluate_perplexity
from pernode.serve.models.loader import load_model
from pernode.shrink.recipes import PRUNED_RECIPES, RECIPES
from pernode.slo import SLO

ALL_RECIPES = {**RECIPES, **PRUNED_RECIPES}  # quantized and pruned: any may be a variant

# (base model, folder to write into) -> the checkpoint's path: how pruned or distilled variants plug in
MakeCheckpoint = Callable[[str, str], str]


@dataclass(frozen=True)
class Variant:
    """One way to serve the model: a checkpoint (the base, a shrink recipe applied to it, or one `make_checkpoint`
    writes) run with `engine` settings on top of the frontier's own (EngineConfig field names)."""

    name: str
    description: str
    recipe: str | None = None  # a name in shrink.recipes.RECIPES or PRUNED_RECIPES
    engine: Mapping[str, Any] = field(default_factory=dict)
    make_checkpoint: MakeCheckpoint | None = None

    def __post_init__(self) -> None:
        if self.recipe is not None and self.make_checkpoint is not None:
            raise ValueError(f"variant {self.name!r}: recipe={self.recipe!r} and make_checkpoint both set: allowed one")
        if self.recipe is not None and self.recipe not in ALL_RECIPES:
            raise ValueError(f"variant {self.name!r}: recipe={self.recipe!r} is unknown: allowed "
                             f"{', '.join(ALL_RECIPES)}")
        allowed = set(EngineConfig.__dataclass_fields__) - {"model"}  # the checkpoint is the variant's own
        unknown = sorted(set(self.engine) - allowed)
        if unknown:
            raise ValueError(f"variant {self.name!r}: engine settings {unknown} are not allowed: a variant may set "
                             f"{', '.join(sorted(allowed))}")


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add a variant to the frontier (one line per checkpoint kind); ValueError if the name is taken."""
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


# The engine's defaults (bf16 where the CPU computes it natively, GGUF weights at their own precision) differ by
# machine, so every variant names its dtype and GGUF weights: the frontier compares setups, not defaults.
_FP32 = {"dtype": "float32", "gguf_weights": "float"}
_BF16 = {"dtype": "bfloat16", "gguf_weights": "float"}
for _v in (
    Variant("fp32", "float32 weights and KV cache: the baseline", engine=_FP32),
    Variant("bf16", "bfloat16 weights and KV cache", engine=_BF16),
    Variant("gguf-native", "the GGUF's own 4/8-bit weights through the int4/int8 kernels, bf16 or fp32 compute as "
            "the CPU allows", engine={"gguf_weights": "native"}),
    Variant("int8-kv", "float32 weights, int8 KV cache (per-token scales)", engine={**_FP32, "kv_cache_dtype": "int8"}),
    Variant("bf16+int8-kv", "bfloat16 weights, int8 KV cache", engine={**_BF16, "kv_cache_dtype": "int8"}),
    Variant("rtn-int8", "int8 weights per channel, round to nearest", recipe="rtn-int8"),
    Variant("w8a8", "SmoothQuant W8A8: int8 weights and activations", recipe="smoothquant-w8a8"),
    Variant("rtn-int4", "int4 weights, groups of 64, round to nearest", recipe="rtn-int4-g64"),
    Variant("gptq-int4", "int4 weights, groups of 64, GPTQ", recipe="gptq-int4-g64"),
    Variant("awq-int4", "int4 weights, groups of 64, AWQ", recipe="awq-int4-g64"),
    Variant("gptq-int4+int8-kv", "GPTQ int4 weights and an int8 KV cache", recipe="gptq-int4-g64",
            engine={"kv_cache_dtype": "int8"}),
    # pruned (pernode prune): fp32 so the bitmask GEMV serves the unstructured ones (it reads fp32 weights)
    Variant("sparsegpt-50", "50% unstructured sparsity, SparseGPT, fp32", recipe="sparsegpt-50", engine=_FP32),
    Variant("sparsegpt-2:4", "2:4 semi-structured sparsity, SparseGPT, fp32", recipe="sparsegpt-2:4", engine=_FP32),
    Variant("sparsegpt-50+gptq-int4", "50% SparseGPT, then GPTQ int4 weights (groups of 64) in one pass",
            recipe="sparsegpt-50+gptq-int4-g64"),
    Variant("structured-ffn1024", "structured pruning: FFN 1536 -> 1024 channels by activation importance, "
            "least-squares refit on 16 windows, fp32", engine=_FP32,
            make_checkpoint=structured_pruned("ffn=1024", refit_windows=16)),
    Variant("distilled", "a distilled student (pernode distill --out CHECKPOINTS/distilled), fp32", engine=_FP32,
            make_checkpoint=checkpoint_at("distilled", "make it with `pernode distill --out CHECKPOINTS/distilled` or "
                                          "name another with --variant distilled=PATH")),
):
    register_variant(_v)

QUICK_VARIANTS = ("fp32", "int8-kv", "rtn-int4")
ON_REQUEST = ("distilled",)  # a checkpoint made elsewhere: only when asked for, never in the default list


def default_variant_names() -> list[str]:
    """Every registered variant the frontier can make by itself."""
    return [n for n in VARIANTS if n not in ON_REQUEST]


def path_variant(spec: str) -> Variant:
    """`NAME=PATH` (e.g. distilled=out/student): a checkpoint folder served in fp32 under NAME, measured as every
    other variant is. A registered NAME keeps its engine settings and description."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"variant={spec!r}: write NAME=PATH, e.g. distilled=out/student")
    known = VARIANTS.get(name)
    if known is not None and (known.recipe is not None or known.make_checkpoint is None):
        raise ValueError(f"variant={spec!r}: {name!r} is a registered variant made from the base model; pick "
                         f"another name for a checkpoint folder")
    return Variant(name, (known.description if known else "checkpoint") + f" at {path}",
                   engine=dict(known.engine) if known else _FP32,
                   make_checkpoint=checkpoint_at(os.path.abspath(path), "pass a folder holding a served checkpoint"))


def variants_named(names: Sequence[str]) -> list[Variant]:
    """The registered variants of these names, in order; ValueError listing the allowed names for any other."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"variants={','.join(unknown)}: unknown; allowed {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in names]


@dataclass(frozen=True)
class FrontierSettings:
    """How hard each variant is measured. The defaults are short profiles: enough for a plan's step-time model."""

    device: str | None = None
    num_threads: int | None = None  # CPU threads for torch (None: torch's default)
    kv_cache_bytes: int = 2**30  # the same KV budget for every variant: a smaller KV dtype holds more tokens
    max_model_len: int = 2048
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    prompt_lens: tuple[int, ...] = (64, 256, 1024)
    context_len: int = 256
    ppl_seq_len: int = 512
    ppl_windows: int = 2
    calib_windows: int = 8
    num_requests: int = 1000  # simulated per fleet size
    seed: int = 0
    rounds: int = 3  # profiles per variant, interleaved: round r profiles every variant once; medians per point

    def __post_init__(self) -> None:
        check_range("kv_cache_bytes", self.kv_cache_bytes, 1)
        check_range("max_model_len", self.max_model_len, 2)
        check_range("ppl_seq_len", self.ppl_seq_len, 2, self.max_model_len)
        check_range("ppl_windows", self.ppl_windows, 1)
        check_range("calib_windows", self.calib_windows, 1)
        check_range("context_len", self.context_len, 1, self.max_model_len - 1)
        check_range("num_requests", self.num_requests, 100)
        check_range("num_threads", self.num_threads, 1, optional=True)
        check_range("rounds", self.rounds, 1)
        for name in ("batch_sizes", "prompt_lens"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}={values!r}: must be a non-empty list of whole numbers >= 1")

    @classmethod
    def quick(cls, **overrides) -> "FrontierSettings":
        """Short enough for `pernode report --quick`: two batch sizes and two prompt lengths, one window."""
        return replace(cls(batch_sizes=(1, 16), prompt_lens=(64, 256), context_len=128, ppl_windows=1,
                           num_requests=500, rounds=1), **overrides)


@dataclass(frozen=True)
class VariantResult:
    """What was measured of one variant: where its checkpoint lies, its perplexity and its node's profile."""

    variant: Variant
    checkpoint: str
    perplexity: float
    profile: Profile
    kv_bytes_per_token: int


class CheckpointMaker:
    """Writes each recipe's checkpoint once under `folder` (several variants may share one) and reuses one already
    there from an earlier run (`pernode report` writes the same names under its checkpoints/)."""

    def __init__(self, base_model: str, folder: str, calib_windows: int):
        self.base_model, self.folder, self.calib_windows = base_model, folder, calib_windows
        self._calibration = None

    def __call__(self, variant: Variant) -> str:
        if variant.make_checkpoint is not None:
            return variant.make_checkpoint(self.base_model, self.folder)
        if variant.recipe is None:
            return self.base_model
        recipe = ALL_RECIPES[variant.recipe]
        path = os.path.join(self.folder, recipe.name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        model, source = load_model(self.base_model)
        if recipe.needs_calibration and self._calibration is None:
            self._calibration = calibration_windows(source.tokenizer, 512, self.calib_windows)
        recipe.apply(model, self._calibration, quiet=True)
        save_checkpoint(model, source, path, recipe)  # pruned float weights as a sparse bitmask, else quantized
        return path


def load_engine(variant: Variant, checkpoint: str, settings: FrontierSettings) -> LLMEngine:
    """The checkpoint served as `pernode serve` would, with the variant's engine settings."""
    return LLMEngine(EngineConfig(model=checkpoint, device=settings.device, kv_cache_bytes=settings.kv_cache_bytes,
                                  max_model_len=settings.max_model_len, num_threads=settings.num_threads,
                                  **dict(variant.engine)))


def profile_engine(engine: LLMEngine, settings: FrontierSettings, hardware: HardwareSection, seed: int) -> Profile:
    return run_profile(engine, quick=True, hardware=hardware, seed=seed, batch_sizes=settings.batch_sizes,
                       prompt_lens=settings.prompt_lens, context_len=settings.context_len)


def measure_variant(variant: Variant, checkpoint: str, settings: FrontierSettings,
                    hardware: HardwareSection) -> VariantResult:
    """Serve the checkpoint, score its perplexity on that engine's model and KV cache dtype, and profile the node
    once (run_frontier interleaves rounds of profiles across variants instead)."""
    engine = load_engine(variant, checkpoint, settings)
    try:
        ppl = evaluate_perplexity(engine.model, engine.tokenizer, seq_len=settings.ppl_seq_len,
                                  max_windows=settings.ppl_windows, kv_cache_dtype=engine.kv_cache_dtype)
        profile = profile_engine(engine, settings, hardware, settings.seed)
        return VariantResult(variant, checkpoint, ppl.perplexity, profile, engine.kv_bytes_per_token)
    finally:
        del engine
        gc.collect()


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Round r (0-based) starts r places further along: each variant takes each position in turn, so none is
    always measured first (fresh caches) or last (after the others warmed the machine)."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def measure_in_rounds(ordered: Sequence[Variant], checkpoints: Mapping[str, str], settings: FrontierSettings,
                      hardware: HardwareSection, say: Callable[[str], None]
                      ) -> tuple[list[VariantResult], list[dict]]:
    """Every variant profiled once per round for `settings.rounds` rounds, one engine in memory at a time (each
    round reloads each engine); perplexity in the first round only (it does not depend on the load). Returns the
    results with each point's median over the rounds, and what each round saw (order, load, reload time)."""
    names = [v.name for v in ordered]
    by_name = {v.name: v for v in ordered}
    perplexity, kv_bytes, profiles = {}, {}, {n: [] for n in names}
    rounds = []
    for r in range(settings.rounds):
        order = round_order(names, r)
        record = {"round": r + 1, "order": order, "load_avg_1m": [round(os.getloadavg()[0], 2)], "variants": {}}
        for name in order:
            variant = by_name[name]
            say(f"round {r + 1}/{settings.rounds}: {name}")
            load_before, start = os.getloadavg()[0], time.perf_counter()
            engine = load_engine(variant, checkpoints[name], settings)
            load_s = time.perf_counter() - start
            try:
                if name not in perplexity:
                    perplexity[name] = evaluate_perplexity(
                        engine.model, engine.tokenizer, seq_len=settings.ppl_seq_len, max_windows=settings.ppl_windows,
                        kv_cache_dtype=engine.kv_cache_dtype).perplexity
                    kv_bytes[name] = engine.kv_bytes_per_token
                profile = profile_engine(engine, settings, hardware, settings.seed + r)
            finally:
                del engine
                gc.collect()
            profiles[name].append(profile)
            step_1 = min(profile["decode"], key=lambda p: p["batch_size"])["step_s"] if profile["decode"] else None
            record["variants"][name] = {"load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                                        "engine_load_s": round(load_s, 3),
                                        "decode_step_s_smallest_batch": step_1}
        record["load_avg_1m"].append(round(os.getloadavg()[0], 2))
        rounds.append(record)
    results = [VariantResult(by_name[n], checkpoints[n], perplexity[n], median_profile(profiles[n]), kv_bytes[n])
               for n in names]
    return results, rounds


def _rounds_note(rounds: Sequence[dict]) -> str:
    loads = "; ".join(f"round {r['round']} {r['load_avg_1m'][0]:.1f}-{r['load_avg_1m'][1]:.1f}" for r in rounds)
    reloads = [v["engine_load_s"] for r in rounds[1:] for v in r["variants"].values()]
    cost = (f"; rounds after the first reloaded each engine, {len(reloads)} loads of "
            f"{statistics.median(reloads):.1f} s median ({sum(reloads):.0f} s in all)" if reloads else "")
    return (f"{len(rounds)} interleaved round(s), every variant profiled once per round in a rotating order, each "
            f"point the median over rounds; 1-minute load average per round: {loads}{cost}")


def run_frontier(base_model: str, variants: Sequence[Variant], workload: Workload, slo: SLO, *,
                 price_per_node_hour: float | None = None, instance: str | None = None,
                 settings: FrontierSettings | None = None, checkpoints_dir: str = "frontier-checkpoints",
                 project: str | None = None, baseline: str = "fp32",
                 progress: Callable[[str], None] | None = None) -> tuple[Frontier, list[VariantResult]]:
    """Measure and plan every variant (the baseline first, added if missing) and mark the frontier.

    Profiles are taken in `settings.rounds` interleaved rounds (measure_in_rounds), so a load that drifts over the
    run falls on every variant alike. `project`: plan each variant on a published accelerator by projecting its
    measured profile along the roofline (measure/profile/projection.py); every point is then labelled projected."""
    settings = settings or FrontierSettings()
    say = progress or (lambda _msg: None)
    by_name = {**VARIANTS, **{v.name: v for v in variants}}
    if baseline not in by_name:
        raise ValueError(f"baseline={baseline!r}: unknown; allowed {', '.join(by_name)}")
    ordered = [by_name[baseline]] + [v for v in variants if v.name != baseline]
    price = resolve_price(price_per_node_hour, instance)  # early: a bad price fails before minutes of measuring
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    say(f"measuring {device} peaks once for all {len(ordered)} variants")
    hardware = measure_peaks(device, quick=True)
    make = CheckpointMaker(base_model, checkpoints_dir, settings.calib_windows)
    checkpoints = {}
    for i, variant in enumerate(ordered, 1):
        say(f"[{i}/{len(ordered)}] {variant.name}: {variant.description}")
        checkpoints[variant.name] = make(variant)
    results, rounds = measure_in_rounds(ordered, checkpoints, settings, hardware, say)

    points = []
    base_ppl = results[0].perplexity
    for result in results:
        variant = result.variant
        profile = project_profile(result.profile, project) if project else result.profile
        fleet = plan(profile, workload, slo, price_per_node_hour, instance=instance,
                     num_requests=settings.num_requests, seed=settings.seed, interval_seeds=1)  # points, not ranges
        point = point_from_plan(variant.name, variant.description, result.perplexity, base_ppl, fleet,
                                result.kv_bytes_per_token)
        points.append(point)
        say(f"    {variant.name}: ppl {point.perplexity:.3f} ({100 * point.ppl_increase:+.2f}%), "
            + (f"{point.replicas} replicas, ${point.cost_per_month_usd:,.0f}/month, "
               f"${point.cost_per_million_output_tokens_usd:.3f}/M output tokens" if point.feasible
               else f"no fleet meets the SLO: {point.reason}"))

    notes = [f"perplexity: held-out pydoc text, {settings.ppl_windows} window(s) of {settings.ppl_seq_len} tokens, "
             f"each variant on its own served model and KV cache dtype; increase vs {baseline}",
             f"every variant served with the same KV cache budget, {settings.kv_cache_bytes / 2**20:,.0f} MiB, "
             f"max_model_len {settings.max_model_len}",
             f"decode profiled at batch sizes {list(settings.batch_sizes)}, context {settings.context_len}; "
             f"prefill at prompt lengths {list(settings.prompt_lens)}; step times beyond are extrapolated",
             f"node price: ${price.per_node_hour_usd:g}/node-hour, {price.source}",
             # a shared machine's load moves step times by several x: printed so a reader can judge the comparison
             _rounds_note(rounds) + f" (on {os.cpu_count()} CPUs)"]
    if project:
        notes.append(f"PROJECTED: each measured profile projected to {project} along the roofline "
                     f"(measure/profile/projection.py); not measured on that hardware")
    frontier = Frontier.build(baseline, points, workload.describe(), slo.describe(),
                              f"${price.per_node_hour_usd:g}/node-hour ({price.instance or price.source})", notes,
                              rounds=rounds)
    return frontier, results


def frontier_rows(frontier: Frontier) -> list[dict]:
    """The points as plain dicts (the report's chart and table take these)."""
    return [p.to_dict() for p in frontier.points]


def describe_choice(point: FrontierPoint | None, max_ppl_increase: float) -> str:
    """The buyer's answer in one line."""
    budget = f"{100 * max_ppl_increase:g}%"
    if point is None:
        return f"no variant keeps perplexity within {budget} of the baseline and meets the SLO"
    kind = " (projected)" if point.profile_kind == "projected" else ""
    return (f"cheapest within {budget} perplexity: {point.name}{kind}, {point.replicas} replicas, "
            f"${point.cost_per_month_usd:,.0f}/month, ${point.cost_per_million_output_tokens_usd:.3f}/M output "
            f"tokens, perplexity {100 * point.ppl_increase:+.2f}%")
