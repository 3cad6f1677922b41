"""How big a batch one replica should run: the largest whose pure-decode step meets the TPOT SLO, whose requests'
KV fits in the cache (counted in whole blocks, as the engine's KV cache counts them), and that leaves a token of the
step budget for prompts. The step time it is checked against comes from price/step_time.py.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pernode.config import DEFAULT_BLOCK_SIZE
from pernode.measure.profile.profile_schema import Profile
from pernode.price.step_time import StepTimeModel, profile_number


class BatchLimit(str, enum.Enum):
    """Which limit set a replica's max batch."""

    TPOT_SLO = "tpot_slo"
    KV_CACHE = "kv_cache"
    TOKEN_BUDGET = "token_budget"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MaxBatch:
    """The largest batch one replica should run, and which limit set it."""

    batch_size: int  # 0 when no batch meets the limits
    limited_by: BatchLimit
    tpot_limit: int | None  # largest batch whose pure-decode step meets the TPOT SLO; None without a TPOT SLO
    kv_limit: int  # largest batch whose mean context fits in kv_cache.max_tokens
    decode_step_s: float  # step time at batch_size
    extrapolated: bool  # batch_size lies beyond the largest measured decode batch

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "limited_by": self.limited_by.value, "tpot_limit": self.tpot_limit,
                "kv_limit": self.kv_limit, "decode_step_s": self.decode_step_s, "extrapolated": self.extrapolated}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MaxBatch":
        try:
            limited_by = BatchLimit(d["limited_by"])
            return cls(int(d["batch_size"]), limited_by, None if d["tpot_limit"] is None else int(d["tpot_limit"]),
                       int(d["kv_limit"]), float(d["decode_step_s"]), bool(d["extrapolated"]))
        except KeyError as e:
            raise ValueError(f"max_batch_per_replica: missing {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"max_batch_per_replica={dict(d)!r}: {e}") from None


def kv_max_tokens(profile: Profile) -> int:
    kv = profile.get("kv_cache")
    if not isinstance(kv, Mapping):
        raise ValueError("profile kv_cache is missing: the planner needs kv_cache.max_tokens; re-run `pernode profile`")
    return int(profile_number(kv, "max_tokens", "kv_cache"))


def kv_block_size(profile: Profile) -> int:
    """The engine's KV block size the profile was taken with (the engine's default when an older profile lacks it)."""
    kv = profile.get("kv_cache") or {}
    return int(profile_number(kv, "block_size", "kv_cache")) if "block_size" in kv else DEFAULT_BLOCK_SIZE


def kv_blocks_held_mean(prompt_tokens: float, output_tokens: float, block_size: int) -> float:
    """Blocks a request holds on average over its steps, counted as the engine's KV cache counts them: its
    prefill step holds blocks for the prompt, and the step that samples output token j (j >= 2) holds blocks for
    prompt + j - 1 tokens, in whole blocks of `block_size`. The simulator runs that very KV cache, so the batch
    the planner sizes is the batch the simulator and the engine hold on average."""
    p, o = max(float(prompt_tokens), 1.0), max(int(round(output_tokens)), 1)
    tokens = p + np.arange(o, dtype=np.float64)  # prefill: p; then p + 1 ... p + o - 1
    return float(np.mean(np.ceil(tokens / block_size)))


def max_batch_size(step_model: StepTimeModel, kv_max_tokens: int, mean_context_tokens: float,
                   tpot_slo_s: float | None = None, token_budget: int | None = None, *,
                   mean_prompt_tokens: float | None = None, mean_output_tokens: float | None = None,
                   block_size: int = 1) -> MaxBatch:
    """Largest b with decode_step_s(b') <= TPOT SLO for every b' <= b, and b requests' KV fitting in kv_max_tokens.

    Given the mean prompt and output, the KV bound is the engine's own rule (`kv_blocks_held_mean`): blocks in
    the cache over blocks a request holds on average over its life. Without them, the older and conservative
    bound: b * mean context (prompt + whole output) <= KV tokens. The pure-decode step is the best TPOT a batch
    can give; prefill chunks riding along stretch it, which the simulator measures.
    """
    if mean_prompt_tokens is not None and mean_output_tokens is not None:
        held = kv_blocks_held_mean(mean_prompt_tokens, mean_output_tokens, block_size)
        kv_limit = int((kv_max_tokens // block_size) // held)
    else:
        kv_limit = int(kv_max_tokens // max(mean_context_tokens, 1.0))
    limit, limited_by = kv_limit, BatchLimit.KV_CACHE
    if token_budget is not None and token_budget - 1 < limit:
        # Decodes take one budget token each; keep at least one for prompts so admissions never starve.
        limit, limited_by = token_budget - 1, BatchLimit.TOKEN_BUDGET
    tpot_limit = None
    if tpot_slo_s is not None:
        # largest b in [0, limit] whose step, and every smaller batch's, meets the SLO: the measured curve dips
        # where the kernels' tiles fill, but a replica at max batch b also runs every batch below it
        tpot_limit = 0
        while tpot_limit < max(limit, 0) and step_model.decode_step_s(tpot_limit + 1) <= tpot_slo_s:
            tpot_limit += 1
        if tpot_limit < limit:
            limit, limited_by = tpot_limit, BatchLimit.TPOT_SLO
    limit = max(limit, 0)
    return MaxBatch(limit, limited_by, tpot_limit, kv_limit, step_model.decode_step_s(limit),
                    limit > step_model.max_measured_batch)
