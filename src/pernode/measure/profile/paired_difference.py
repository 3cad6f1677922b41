"""The median of paired differences with a distribution-free confidence interval: how much one path adds over
another when both ran the same work, alternately, on a machine whose load drifts.

Pairing takes the drift out (both halves of a pair see nearly the same machine); the median keeps a few pairs
hit by a neighbour's burst from moving the estimate. The interval for the median comes from order statistics
(the sign test's binomial, no assumption about the shape of the noise; e.g. Hollander & Wolfe, Nonparametric
Statistical Methods, 3rd ed., sec. 3.6): with n pairs it is [d_(k), d_(n+1-k)] for the largest k whose
two-sided miss probability stays under 1 - confidence. When it holds 0 the difference is below the noise of
this run, and the result says so rather than clamping it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

DEFAULT_CONFIDENCE = 0.95


def median_interval_ranks(n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[int, int]:
    """1-based ranks (lo, hi) of the order statistics bounding the median at `confidence` or more; with too few
    pairs for that, the whole range (1, n), whose coverage is 1 - 2^(1-n)."""
    if n < 1:
        raise ValueError(f"n={n}: allowed >= 1 pairs")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: allowed in (0, 1)")
    tail = 0.0  # P(Binomial(n, 1/2) < k), the chance the median lies below d_(k)
    best = 1
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2**n
        if 2 * tail > 1 - confidence:
            break
        best = k
    return best, n + 1 - best


def interval_coverage(n: int, lo_rank: int) -> float:
    """The exact coverage of [d_(lo), d_(n+1-lo)] for the median of n pairs."""
    return 1.0 - 2 * sum(math.comb(n, j) for j in range(lo_rank)) / 2**n


@dataclass(frozen=True)
class PairedDifference:
    """The median of `b - a` over pairs, its spread and whether it stands out of the run's noise."""

    median_s: float
    interval_s: tuple[float, float]  # for the median, at `coverage`
    coverage: float
    quartiles_s: tuple[float, float]  # 25th and 75th percentile of the differences: their spread
    pairs: int

    @property
    def below_noise(self) -> bool:
        """True when the interval holds 0: this run cannot tell the difference from none (or from its sign)."""
        return self.interval_s[0] <= 0.0 <= self.interval_s[1]

    @property
    def planned_s(self) -> float:
        """What a plan may add: the median, or 0 when the median is negative (a path cannot take negative time;
        a negative median means the two timings differ by noise or by a bias of the measurement)."""
        return max(0.0, self.median_s)

    def describe(self, what: str, unit_ms: float = 1000.0) -> str:
        lo, hi = (v * unit_ms for v in self.interval_s)
        q1, q3 = (v * unit_ms for v in self.quartiles_s)
        line = (f"{what}: median {self.median_s * unit_ms:+.2f} ms over {self.pairs} pairs, "
                f"{100 * self.coverage:.0f}% interval [{lo:+.2f}, {hi:+.2f}] ms, quartiles [{q1:+.2f}, {q3:+.2f}] ms")
        if not self.below_noise and self.median_s < 0:
            return line + ("; NEGATIVE beyond the noise (the first path was slower on every pair or nearly: the "
                           "two halves did not see the same machine, or the measurement is biased): planned as 0 ms")
        if not self.below_noise:
            return line + f"; planned as {self.planned_s * unit_ms:.2f} ms"
        if self.median_s < 0:
            return line + "; BELOW THE NOISE (the interval holds 0 and the median is negative): planned as 0 ms"
        return line + (f"; BELOW THE NOISE (the interval holds 0): planned as the median, "
                       f"{self.planned_s * unit_ms:.2f} ms")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval_s"], d["quartiles_s"] = list(self.interval_s), list(self.quartiles_s)
        d["below_noise"], d["planned_s"] = self.below_noise, self.planned_s
        return d


def paired_difference(a_s: Sequence[float], b_s: Sequence[float],
                      confidence: float = DEFAULT_CONFIDENCE) -> PairedDifference:
    """Summarise `b - a` pair by pair (the same work timed both ways)."""
    if len(a_s) != len(b_s):
        raise ValueError(f"paired timings differ in length: {len(a_s)} vs {len(b_s)}")
    diffs = sorted(float(b) - float(a) for a, b in zip(a_s, b_s))
    n = len(diffs)
    if n == 0:
        raise ValueError("no pairs: need at least one timing each way")
    lo, hi = median_interval_ranks(n, confidence)
    quartiles = statistics.quantiles(diffs, n=4, method="inclusive") if n > 1 else [diffs[0]] * 3
    return PairedDifference(statistics.median(diffs), (diffs[lo - 1], diffs[hi - 1]), interval_coverage(n, lo),
                            (quartiles[0], quartiles[2]), n)
