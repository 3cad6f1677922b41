"""Latency service-level objectives and which requests meet them: the one SLO rule of pernode.

TTFT, TPOT and E2E are measured as in vLLM's benchmark_serving: TPOT = (E2E - TTFT) / (output tokens - 1), so a
one-token answer has no TPOT (NaN) and cannot miss it. A request attains the SLO when it meets every objective that
is set (DistServe's "SLO attainment", Zhong et al., arXiv 2401.09670). The planner's simulator and the bench's
goodput both apply `SLO.met`, so a predicted and a measured goodput count the same requests as good.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

# The user's form (milliseconds, as vLLM's --goodput takes them) -> the field (seconds).
_KEYS = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s", "e2e_ms": "e2e_s"}
_EXAMPLE = "e.g. ttft_ms=500,tpot_ms=50"


def _ms_to_s(key: str, value: object, text: object) -> float:
    try:
        ms = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ms = math.nan
    if isinstance(value, bool) or not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"slo={text!r}: {key} must be a number of milliseconds > 0, {_EXAMPLE}")
    return ms / 1000.0


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
                raise ValueError(f"{name}={v!r}: must be a finite number of seconds > 0, or unset")

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """'ttft_ms=500,tpot_ms=50,e2e_ms=20000' (any non-empty subset): the `slo` setting as users write it."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise ValueError(f"slo={text!r}: expected KEY=MILLISECONDS with KEY one of {', '.join(_KEYS)}, "
                                 f"{_EXAMPLE} (bad item {part!r})")
            values[_KEYS[key]] = _ms_to_s(key, val.strip(), text)
        if not values:
            raise ValueError(f"slo={text!r}: give at least one of {', '.join(_KEYS)}, {_EXAMPLE}")
        return cls(**values)

    @classmethod
    def from_dict(cls, d: Mapping[str, float | None]) -> "SLO":
        """The inverse of `to_dict`: {"ttft_ms": 500.0, "tpot_ms": None, ...}; absent or None keys are unset."""
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise ValueError(f"slo={dict(d)!r}: unknown keys {unknown}; allowed {', '.join(_KEYS)}")
        return cls(**{_KEYS[k]: _ms_to_s(k, v, dict(d)) for k, v in d.items() if v is not None})

    def to_dict(self) -> dict[str, float | None]:
        """Milliseconds under ttft_ms/tpot_ms/e2e_ms, None where unset. Rounded to 1e-9 ms so that a figure the
        user typed comes back as typed (1001 ms is not exactly 1.001 s in binary)."""
        return {k: (None if getattr(self, f) is None else round(getattr(self, f) * 1000.0, 9))
                for k, f in _KEYS.items()}

    @property
    def is_empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def met(self, ttft_s: np.ndarray, tpot_s: np.ndarray, e2e_s: np.ndarray) -> np.ndarray:
        """Boolean per request: every set objective met. NaN TPOT (one output token) counts as met."""
        ttft_s, tpot_s, e2e_s = (np.asarray(a, dtype=np.float64) for a in (ttft_s, tpot_s, e2e_s))
        ok = np.ones(np.shape(ttft_s), dtype=bool)
        if self.ttft_s is not None:
            ok &= ttft_s <= self.ttft_s
        if self.tpot_s is not None:
            ok &= ~(tpot_s > self.tpot_s)  # NaN compares False, so it passes
        if self.e2e_s is not None:
            ok &= e2e_s <= self.e2e_s
        return ok

    def describe(self) -> str:
        parts = [f"{k}<={ms:g}" for k, ms in self.to_dict().items() if ms is not None]
        return ", ".join(parts) if parts else "none"
