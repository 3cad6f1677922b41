"""Latency service-level objectives and which requests meet them.

TTFT, TPOT and E2E are measured as in vLLM's benchmark_serving: TPOT = (E2E - TTFT) / (output tokens - 1), so a
one-token answer has no TPOT and cannot miss it. A request attains the SLO when it meets every objective that is set
(DistServe's "SLO attainment", Zhong et al., arXiv 2401.09670).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_KEYS = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s", "e2e_ms": "e2e_s"}


@dataclass(frozen=True)
class SLO:
    """Per-request latency limits in seconds; None means no limit on that measure."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"SLO {name} = {v!r}: must be a finite number of seconds > 0, or unset")

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """'ttft_ms=500,tpot_ms=50,e2e_ms=20000' (any subset), the CLI's form."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise ValueError(f"--slo item {part!r}: expected KEY=MILLISECONDS with KEY one of "
                                 f"{', '.join(_KEYS)}")
            try:
                ms = float(val)
            except ValueError:
                raise ValueError(f"--slo {key} = {val!r}: must be a number of milliseconds > 0") from None
            if not math.isfinite(ms) or ms <= 0:
                raise ValueError(f"--slo {key} = {val!r}: must be a number of milliseconds > 0")
            values[_KEYS[key]] = ms / 1000.0
        if not values:
            raise ValueError(f"--slo {text!r}: give at least one of {', '.join(_KEYS)}, e.g. ttft_ms=500,tpot_ms=50")
        return cls(**values)

    @property
    def is_empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def met(self, ttft_s: np.ndarray, tpot_s: np.ndarray, e2e_s: np.ndarray) -> np.ndarray:
        """Boolean per request: every set objective met. NaN TPOT (one output token) counts as met."""
        ok = np.ones(np.shape(ttft_s), dtype=bool)
        if self.ttft_s is not None:
            ok &= ttft_s <= self.ttft_s
        if self.tpot_s is not None:
            ok &= ~(tpot_s > self.tpot_s)  # NaN compares False, so it passes
        if self.e2e_s is not None:
            ok &= e2e_s <= self.e2e_s
        return ok

    def to_dict(self) -> dict[str, float | None]:
        return {k: (None if getattr(self, v) is None else getattr(self, v) * 1000.0) for k, v in _KEYS.items()}

    def describe(self) -> str:
        parts = [f"{k}<={ms:g}" for k, ms in self.to_dict().items() if ms is not None]
        return ", ".join(parts) if parts else "none"
