"""The per-node profile (`profile.json`): its types, validation, save/load, and constructors for its parts.

The contract is docs/profile_schema.md; `pernode profile` writes this file and `pernode plan` reads it. Validation
names the bad field by its path (e.g. `profile.decode[2].step_s`) so a hand-edited file is quick to fix. Unknown
extra fields are allowed: a newer writer may add some, and older readers ignore them.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypedDict

from pernode.config import ModelConfig
from pernode.file_modes import user_file_mode
from pernode.measure.profile.roofline import StepCost, compute_key, count_params, dtype_bytes, place_on_roofline
from pernode.records import read_json

SCHEMA_VERSION = 1


def _pernode_version() -> str:
    try:
        return version("pernode")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0"


PERNODE_VERSION = _pernode_version()
FIX_HINT = "re-run `pernode profile`, or fix the file by hand (see docs/profile_schema.md)"


class ModelSection(TypedDict, total=False):
    name: str
    dtype: str
    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool  # optional
    kv_dtype: str  # optional; defaults to dtype


class HardwareSection(TypedDict, total=False):
    name: str
    device: str
    memory_bytes: int
    peak_bandwidth_gbs: float
    peak_flops: dict[str, float | None]  # FLOP/s by compute dtype: fp32, bf16, int8 (and fp8 where known)
    peak_source: str  # "measured", or the datasheet a published peak came from
    measured_flops: dict[str, float | None]  # optional: every measured matmul peak, used as a peak or not
    kernels: dict[str, str]  # optional: how each peak was measured
    notes: list[str]  # optional


class KVCacheSection(TypedDict):
    kv_cache_bytes: int
    block_size: int
    num_blocks: int
    max_tokens: int
    context_len: int
    max_concurrent_seqs: int


class DecodePoint(TypedDict, total=False):
    batch_size: int
    context_len: int
    step_s: float
    output_tokens_per_s: float
    flops_per_step: float
    bytes_per_step: float
    achieved_gbs: float
    achieved_flops: float
    arithmetic_intensity: float
    fraction_of_peak: float
    bound: str


class PrefillPoint(TypedDict, total=False):
    prompt_len: int
    ttft_s: float
    prefill_tokens_per_s: float
    flops: float
    bytes: float
    achieved_flops: float
    fraction_of_peak: float
    bound: str
    achieved_gbs: float  # optional
    arithmetic_intensity: float  # optional


class MixedPoint(TypedDict):
    """One measured step that gives `batch_size` sequences a token each and prefills a `prompt_tokens` chunk."""
    batch_size: int
    context_len: int
    prompt_tokens: int
    step_s: float


class Profile(TypedDict, total=False):
    schema_version: int
    kind: str  # "measured" | "projected"
    projected_from: dict | None
    created_at: str
    pernode_version: str
    model: ModelSection
    hardware: HardwareSection
    kv_cache: KVCacheSection
    decode: list[DecodePoint]
    prefill: list[PrefillPoint]
    crossover_batch_size: int | None
    memory_high_water_bytes: int | None
    serve_runs: list[dict]
    mixed: list[MixedPoint]  # optional: steps holding decodes and a prompt chunk at once


# Field -> (kind, minimum) where kind is "int", "num" or "str"; minimum applies to numbers (inclusive).
_MODEL_FIELDS = {"name": ("str", None), "dtype": ("str", None), "num_params": ("int", 1),
                 "weight_bytes": ("num", 1), "kv_bytes_per_token": ("num", 1), "max_model_len": ("int", 1),
                 "num_layers": ("int", 1), "hidden_size": ("int", 1), "num_heads": ("int", 1),
                 "num_kv_heads": ("int", 1), "head_dim": ("int", 1), "intermediate_size": ("int", 1),
                 "vocab_size": ("int", 1)}
_HARDWARE_FIELDS = {"name": ("str", None), "device": ("str", None), "memory_bytes": ("int", 1),
                    "peak_bandwidth_gbs": ("pos", None), "peak_source": ("str", None)}
_KV_FIELDS = {"kv_cache_bytes": ("num", 0), "block_size": ("int", 1), "num_blocks": ("int", 0),
              "max_tokens": ("int", 0), "context_len": ("int", 1), "max_concurrent_seqs": ("int", 0)}
_DECODE_FIELDS = {"batch_size": ("int", 1), "context_len": ("int", 1), "step_s": ("pos", None),
                  "output_tokens_per_s": ("pos", None), "flops_per_step": ("num", 0),
                  "bytes_per_step": ("pos", None), "achieved_gbs": ("num", 0), "achieved_flops": ("num", 0),
                  "arithmetic_intensity": ("num", 0), "fraction_of_peak": ("num", 0), "bound": ("bound", None)}
_PREFILL_FIELDS = {"prompt_len": ("int", 1), "ttft_s": ("pos", None), "prefill_tokens_per_s": ("pos", None),
                   "flops": ("num", 0), "bytes": ("pos", None), "achieved_flops": ("num", 0),
                   "fraction_of_peak": ("num", 0), "bound": ("bound", None)}
_MIXED_FIELDS = {"batch_size": ("int", 1), "context_len": ("int", 1), "prompt_tokens": ("int", 1),
                 "step_s": ("pos", None)}
_PREFILL_OPTIONAL = {"achieved_gbs": ("num", 0), "arithmetic_intensity": ("num", 0)}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_field(where: str, obj: dict, name: str, kind: str, minimum: float | None) -> None:
    path = f"{where}.{name}"
    if name not in obj:
        raise ValueError(f"{path} is missing; {FIX_HINT}")
    v = obj[name]
    if kind == "str":
        if not isinstance(v, str) or not v:
            raise ValueError(f"{path} = {v!r}: must be a non-empty string; {FIX_HINT}")
    elif kind == "bound":
        if v not in ("memory", "compute"):
            raise ValueError(f"{path} = {v!r}: must be 'memory' or 'compute'; {FIX_HINT}")
    elif kind == "int":
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{path} = {v!r}: must be an integer >= {minimum}; {FIX_HINT}")
    elif kind == "pos":
        if not _is_num(v) or v <= 0:
            raise ValueError(f"{path} = {v!r}: must be a finite number > 0; {FIX_HINT}")
    else:  # "num"
        if not _is_num(v) or v < minimum:
            raise ValueError(f"{path} = {v!r}: must be a finite number >= {minimum}; {FIX_HINT}")


def _check_section(where: str, obj: Any, fields: dict, optional: dict | None = None) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} = {type(obj).__name__}: must be an object; {FIX_HINT}")
    for name, (kind, minimum) in fields.items():
        _check_field(where, obj, name, kind, minimum)
    for name, (kind, minimum) in (optional or {}).items():
        if name in obj and obj[name] is not None:
            _check_field(where, obj, name, kind, minimum)


def validate_profile(d: Any) -> Profile:
    """Check a profile dict against schema version 1; raise ValueError naming the first bad field. Returns `d`."""
    if not isinstance(d, dict):
        raise ValueError(f"profile = {type(d).__name__}: must be a JSON object; {FIX_HINT}")
    v = d.get("schema_version")
    if v != SCHEMA_VERSION:
        raise ValueError(f"profile.schema_version = {v!r}: this pernode reads version {SCHEMA_VERSION}; "
                         f"re-run `pernode profile` with this version")
    if d.get("kind") not in ("measured", "projected"):
        raise ValueError(f"profile.kind = {d.get('kind')!r}: must be 'measured' or 'projected'; {FIX_HINT}")
    if d["kind"] == "projected" and not isinstance(d.get("projected_from"), dict):
        raise ValueError(f"profile.projected_from = {d.get('projected_from')!r}: a projected profile must say what "
                         f"it was projected from (an object); {FIX_HINT}")
    if d["kind"] == "measured" and d.get("projected_from") is not None:
        raise ValueError(f"profile.projected_from = {d['projected_from']!r}: must be null when kind is 'measured'")
    for name in ("created_at", "pernode_version"):
        _check_field("profile", d, name, "str", None)
    _check_section("profile.model", d.get("model"), _MODEL_FIELDS)
    _check_section("profile.hardware", d.get("hardware"), _HARDWARE_FIELDS)
    peaks = d["hardware"].get("peak_flops")
    if not isinstance(peaks, dict) or not any(_is_num(x) and x > 0 for x in peaks.values()):
        raise ValueError(f"profile.hardware.peak_flops = {peaks!r}: must be an object with at least one peak "
                         f"> 0 FLOP/s (keys fp32, bf16, fp8, int8; null where unknown); {FIX_HINT}")
    for key, x in peaks.items():
        if x is not None and not (_is_num(x) and x > 0):
            raise ValueError(f"profile.hardware.peak_flops.{key} = {x!r}: must be > 0 FLOP/s or null; {FIX_HINT}")
    _check_section("profile.kv_cache", d.get("kv_cache"), _KV_FIELDS)
    for name, fields, optional in (("decode", _DECODE_FIELDS, None), ("prefill", _PREFILL_FIELDS, _PREFILL_OPTIONAL)):
        points = d.get(name)
        if not isinstance(points, list) or not points:
            raise ValueError(f"profile.{name} = {points!r}: must be a non-empty list of points; {FIX_HINT}")
        for i, point in enumerate(points):
            _check_section(f"profile.{name}[{i}]", point, fields, optional)
    mixed = d.get("mixed", [])
    if not isinstance(mixed, list):
        raise ValueError(f"profile.mixed = {mixed!r}: must be a list of points (or absent); {FIX_HINT}")
    for i, point in enumerate(mixed):
        _check_section(f"profile.mixed[{i}]", point, _MIXED_FIELDS)
    for name in ("crossover_batch_size", "memory_high_water_bytes"):
        x = d.get(name)
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 1):
            raise ValueError(f"profile.{name} = {x!r}: must be an integer >= 1 or null; {FIX_HINT}")
    if not isinstance(d.get("serve_runs", []), list):
        raise ValueError(f"profile.serve_runs = {d.get('serve_runs')!r}: must be a list of bench serve results")
    return d  # type: ignore[return-value]


def save_profile(path: str | os.PathLike, d: Profile) -> Path:
    """Validate and write `d` as JSON; the write is atomic so a reader never sees half a file."""
    validate_profile(d)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(d, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, user_file_mode())  # mkstemp makes it 0600; a profile is not a secret
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile: the one way to read `profile.json`. A ValueError says which file and field."""
    d = read_json(path, "profile")
    try:
        return validate_profile(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---- constructors: what `pernode profile` uses to fill the file --------------------------------------------------

def peak_flops_for(hardware: HardwareSection, dtype: str) -> tuple[float, str]:
    """The compute peak a model in `dtype` runs at on `hardware`, and its key.

    Falls back to fp32 (then to the largest known peak) when the matching peak is unknown, e.g. bf16 on a CPU
    without a fast bf16 path, where the engine would compute in fp32.
    """
    peaks = hardware["peak_flops"]
    key = compute_key(dtype)
    for k in (key, "fp32"):
        if peaks.get(k):
            return float(peaks[k]), k
    k = max((k for k in peaks if peaks[k]), key=lambda k: peaks[k])
    return float(peaks[k]), k


def model_section(cfg: ModelConfig, dtype: str, kv_dtype: str | None = None) -> ModelSection:
    kv_dtype = kv_dtype or dtype
    return {
        "name": cfg.name, "dtype": dtype, "num_params": count_params(cfg).total,
        "weight_bytes": int(round(count_params(cfg).total * dtype_bytes(dtype))),
        "kv_bytes_per_token": int(round(cfg.kv_bytes_per_token(1) * dtype_bytes(kv_dtype))),
        "max_model_len": cfg.max_position_embeddings, "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size, "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings, "kv_dtype": kv_dtype,
    }


def config_from_model_section(model: ModelSection) -> ModelConfig:
    """The shapes back as a ModelConfig, enough for roofline counts (not for loading weights)."""
    return ModelConfig(vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
                       intermediate_size=model["intermediate_size"], num_hidden_layers=model["num_layers"],
                       num_attention_heads=model["num_heads"], num_key_value_heads=model["num_kv_heads"],
                       head_dim=model["head_dim"], max_position_embeddings=model["max_model_len"],
                       tie_word_embeddings=bool(model.get("tie_word_embeddings", False)), name=model["name"])


def kv_cache_section(kv_cache_bytes: float, block_size: int, kv_bytes_per_token: float,
                     context_len: int) -> KVCacheSection:
    """Blocks that fit in `kv_cache_bytes`, the tokens they hold, and how many `context_len` sequences fit."""
    if block_size < 1 or context_len < 1 or not kv_bytes_per_token > 0:
        raise ValueError(f"block_size = {block_size}, context_len = {context_len}, kv_bytes_per_token = "
                         f"{kv_bytes_per_token}: all must be > 0")
    kv_cache_bytes = max(0, int(kv_cache_bytes))
    num_blocks = int(kv_cache_bytes // (block_size * kv_bytes_per_token))
    blocks_per_seq = -(-context_len // block_size)
    return {"kv_cache_bytes": kv_cache_bytes, "block_size": block_size, "num_blocks": num_blocks,
            "max_tokens": num_blocks * block_size, "context_len": context_len,
            "max_concurrent_seqs": num_blocks // blocks_per_seq}


def decode_point(batch_size: int, context_len: int, step_s: float, cost: StepCost, hardware: HardwareSection,
                 dtype: str) -> DecodePoint:
    """A measured decode step with its roofline numbers (cost from roofline.decode_step_cost)."""
    peak, _ = peak_flops_for(hardware, dtype)
    rp = place_on_roofline(cost.flops, cost.bytes, step_s, hardware["peak_bandwidth_gbs"], peak)
    return {"batch_size": batch_size, "context_len": context_len, "step_s": step_s,
            "output_tokens_per_s": batch_size / step_s, "flops_per_step": cost.flops, "bytes_per_step": cost.bytes,
            "achieved_gbs": rp.achieved_gbs, "achieved_flops": rp.achieved_flops,
            "arithmetic_intensity": rp.arithmetic_intensity, "fraction_of_peak": rp.fraction_of_peak,
            "bound": rp.bound}


def prefill_point(prompt_len: int, ttft_s: float, cost: StepCost, hardware: HardwareSection,
                  dtype: str) -> PrefillPoint:
    """A measured prefill with its roofline numbers (cost from roofline.prefill_cost)."""
    peak, _ = peak_flops_for(hardware, dtype)
    rp = place_on_roofline(cost.flops, cost.bytes, ttft_s, hardware["peak_bandwidth_gbs"], peak)
    return {"prompt_len": prompt_len, "ttft_s": ttft_s, "prefill_tokens_per_s": prompt_len / ttft_s,
            "flops": cost.flops, "bytes": cost.bytes, "achieved_flops": rp.achieved_flops,
            "fraction_of_peak": rp.fraction_of_peak, "bound": rp.bound, "achieved_gbs": rp.achieved_gbs,
            "arithmetic_intensity": rp.arithmetic_intensity}


def mixed_point(batch_size: int, context_len: int, prompt_tokens: int, step_s: float) -> MixedPoint:
    return {"batch_size": batch_size, "context_len": context_len, "prompt_tokens": prompt_tokens, "step_s": step_s}


def make_profile(model: ModelSection, hardware: HardwareSection, kv_cache: KVCacheSection,
                 decode: list[DecodePoint], prefill: list[PrefillPoint], crossover_batch_size: int | None = None,
                 memory_high_water_bytes: int | None = None, serve_runs: list[dict] | None = None,
                 kind: str = "measured", projected_from: dict | None = None,
                 mixed: list[MixedPoint] | None = None) -> Profile:
    """Assemble and validate a profile, stamping version and time."""
    d: Profile = {
        "schema_version": SCHEMA_VERSION, "kind": kind, "projected_from": projected_from,
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pernode_version": PERNODE_VERSION, "model": model, "hardware": hardware, "kv_cache": kv_cache,
        "decode": sorted(decode, key=lambda p: (p["batch_size"], p["context_len"])),
        "prefill": sorted(prefill, key=lambda p: p["prompt_len"]),
        "crossover_batch_size": crossover_batch_size, "memory_high_water_bytes": memory_high_water_bytes,
        "serve_runs": list(serve_runs or []),
    }
    if mixed:
        d["mixed"] = sorted(mixed, key=lambda p: (p["batch_size"], p["prompt_tokens"]))
    return validate_profile(d)
