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
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from pernode.config import EngineConfig
from pernode.records import check_range
from pernode.measure.profile.hardware import measure_peaks
from pernode.measure.profile.profile_schema import HardwareSection, Profile
from pernode.measure.profile.profiler import run_profile
from pernode.measure.profile.projection import project_profile
from pernode.price.frontier import Frontier, FrontierPoint, point_from_plan
from pernode.price.planner import plan
from pernode.price.pricing import resolve_price
from pernode.price.workload import Workload
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.shrink.checkpoint import save_quantized
from pernode.shrink.evaluate.perplexity import calibration_windows, evaluate_perplexity
from pernode.serve.models.loader import load_model
from pernode.shrink.recipes import RECIPES
from pernode.slo import SLO

# (base model, folder to write into) -> the checkpoint's path: how pruned or distilled variants plug in
MakeCheckpoint = Callable[[str, str], str]


@dataclass(frozen=True)
class Variant:
    """One way to serve the model: a checkpoint (the base, a shrink recipe applied to it, or one `make_checkpoint`
    writes) run with `engine` settings on top of the frontier's own (EngineConfig field names)."""

    name: str
    description: str
    recipe: str | None = None  # a name in shrink.recipes.RECIPES
    engine: Mapping[str, Any] = field(default_factory=dict)
    make_checkpoint: MakeCheckpoint | None = None

    def __post_init__(self) -> None:
        if self.recipe is not None and self.make_checkpoint is not None:
            raise ValueError(f"variant {self.name!r}: recipe={self.recipe!r} and make_checkpoint both set: allowed one")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"variant {self.name!r}: recipe={self.recipe!r} is unknown: allowed {', '.join(RECIPES)}")
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
):
    register_variant(_v)

QUICK_VARIANTS = ("fp32", "int8-kv", "rtn-int4")


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

    def __post_init__(self) -> None:
        check_range("kv_cache_bytes", self.kv_cache_bytes, 1)
        check_range("max_model_len", self.max_model_len, 2)
        check_range("ppl_seq_len", self.ppl_seq_len, 2, self.max_model_len)
        check_range("ppl_windows", self.ppl_windows, 1)
        check_range("calib_windows", self.calib_windows, 1)
        check_range("context_len", self.context_len, 1, self.max_model_len - 1)
        check_range("num_requests", self.num_requests, 100)
        check_range("num_threads", self.num_threads, 1, optional=True)
        for name in ("batch_sizes", "prompt_lens"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}={values!r}: must be a non-empty list of whole numbers >= 1")

    @classmethod
    def quick(cls, **overrides) -> "FrontierSettings":
        """Short enough for `pernode report --quick`: two batch sizes and two prompt lengths, one window."""
        return replace(cls(batch_sizes=(1, 16), prompt_lens=(64, 256), context_len=128, ppl_windows=1,
                           num_requests=500), **overrides)


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
        recipe = RECIPES[variant.recipe]
        path = os.path.join(self.folder, recipe.name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        model, source = load_model(self.base_model)
        if recipe.needs_calibration and self._calibration is None:
            self._calibration = calibration_windows(source.tokenizer, 512, self.calib_windows)
        recipe.apply(model, self._calibration, quiet=True)
        save_quantized(model, source, path, recipe)
        return path


def measure_variant(variant: Variant, checkpoint: str, settings: FrontierSettings,
                    hardware: HardwareSection) -> VariantResult:
    """Serve the checkpoint as `pernode serve` would, score its perplexity on that engine's model and KV cache
    dtype, and profile the node."""
    config = EngineConfig(model=checkpoint, device=settings.device, kv_cache_bytes=settings.kv_cache_bytes,
                          max_model_len=settings.max_model_len, num_threads=settings.num_threads,
                          **dict(variant.engine))
    engine = LLMEngine(config)
    try:
        ppl = evaluate_perplexity(engine.model, engine.tokenizer, seq_len=settings.ppl_seq_len,
                                  max_windows=settings.ppl_windows, kv_cache_dtype=engine.kv_cache_dtype)
        profile = run_profile(engine, quick=True, hardware=hardware, seed=settings.seed,
                              batch_sizes=settings.batch_sizes, prompt_lens=settings.prompt_lens,
                              context_len=settings.context_len)
        return VariantResult(variant, checkpoint, ppl.perplexity, profile, engine.kv_bytes_per_token)
    finally:
        del engine
        gc.collect()


def run_frontier(base_model: str, variants: Sequence[Variant], workload: Workload, slo: SLO, *,
                 price_per_node_hour: float | None = None, instance: str | None = None,
                 settings: FrontierSettings | None = None, checkpoints_dir: str = "frontier-checkpoints",
                 project: str | None = None, baseline: str = "fp32",
                 progress: Callable[[str], None] | None = None) -> tuple[Frontier, list[VariantResult]]:
    """Measure and plan every variant (the baseline first, added if missing) and mark the frontier.

    `project`: plan each variant on a published accelerator by projecting its measured profile along the roofline
    (measure/profile/projection.py); every point is then labelled projected."""
    settings = settings or FrontierSettings()
    say = progress or (lambda _msg: None)
    if baseline not in VARIANTS:
        raise ValueError(f"baseline={baseline!r}: unknown; allowed {', '.join(VARIANTS)}")
    ordered = [VARIANTS[baseline]] + [v for v in variants if v.name != baseline]
    price = resolve_price(price_per_node_hour, instance)  # early: a bad price fails before minutes of measuring
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    say(f"measuring {device} peaks once for all {len(ordered)} variants")
    hardware = measure_peaks(device, quick=True)
    make = CheckpointMaker(base_model, checkpoints_dir, settings.calib_windows)

    results, points, loads = [], [], []
    for i, variant in enumerate(ordered, 1):
        say(f"[{i}/{len(ordered)}] {variant.name}: {variant.description}")
        checkpoint = make(variant)
        load_before = os.getloadavg()[0]
        result = measure_variant(variant, checkpoint, settings, hardware)
        # a shared machine's load moves step times by several x: printed so a reader can judge the comparison
        loads.append(f"{variant.name} {load_before:.1f}-{os.getloadavg()[0]:.1f}")
        profile = project_profile(result.profile, project) if project else result.profile
        fleet = plan(profile, workload, slo, price_per_node_hour, instance=instance,
                     num_requests=settings.num_requests, seed=settings.seed, interval_seeds=1)  # points, not ranges
        base_ppl = results[0].perplexity if results else result.perplexity
        point = point_from_plan(variant.name, variant.description, result.perplexity, base_ppl, fleet,
                                result.kv_bytes_per_token)
        results.append(result)
        points.append(point)
        say(f"    ppl {point.perplexity:.3f} ({100 * point.ppl_increase:+.2f}%), "
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
             f"1-minute load average before-after each variant's measurement: {', '.join(loads)} "
             f"(on {os.cpu_count()} CPUs)"]
    if project:
        notes.append(f"PROJECTED: each measured profile projected to {project} along the roofline "
                     f"(measure/profile/projection.py); not measured on that hardware")
    frontier = Frontier.build(baseline, points, workload.describe(), slo.describe(),
                              f"${price.per_node_hour_usd:g}/node-hour ({price.instance or price.source})", notes)
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
