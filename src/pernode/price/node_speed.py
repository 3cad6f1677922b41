"""The node's speed over time, against its profile: what a replica's engine steps take at each moment of a run.

A profile times the engine once; a shared host then runs the same steps faster or slower from one minute to the
next (docs/fleet.md measured 0.87x-1.28x over two hours on one core, and 6-10% between windows of one run). Near
capacity a few percent of speed moves a latency percentile by several times as much, so a run's errors mix the
model's with the node's. Given the speed the engine actually ran at, window by window (jobs/validate/speed_anchor.py
reads it from the engine's own step records), the simulator can replay a run at that speed and leave only the
model's error. Decode steps and prompt tokens have their own factors: memory-bound decodes and compute-bound
prefills drift apart on a shared host. The serving path (HTTP, tokenizing, streaming), measured apart, is not scaled.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSpeed:
    """Piecewise-constant speed: from `start_s[i]` (seconds from the trace's start) until the next start, the engine's
    decode steps take `decode[i]` times the profile's and its prompt tokens `prefill[i]` times; before the first
    start, the first factors hold."""

    start_s: tuple[float, ...]
    decode: tuple[float, ...]
    prefill: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.start_s)
        if n == 0 or len(self.decode) != n or len(self.prefill) != n:
            raise ValueError(f"NodeSpeed: start_s, decode and prefill need one entry per window, got {n}, "
                             f"{len(self.decode)} and {len(self.prefill)}")
        if any(b <= a for a, b in zip(self.start_s, self.start_s[1:])):
            raise ValueError("NodeSpeed.start_s must increase strictly")
        for name, values in (("decode", self.decode), ("prefill", self.prefill)):
            bad = [v for v in values if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"NodeSpeed.{name}={bad[0]!r}: each factor must be a finite number > 0")

    @classmethod
    def constant(cls, decode: float, prefill: float | None = None) -> "NodeSpeed":
        return cls((0.0,), (float(decode),), (float(decode if prefill is None else prefill),))

    def _window(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.start_s, t) - 1)

    def at(self, t: float) -> tuple[float, float]:
        """(decode factor, prefill factor) at time `t`."""
        i = self._window(t)
        return self.decode[i], self.prefill[i]

    def next_change_s(self, t: float) -> float:
        """When the factors next change after `t`; infinity in the last window."""
        i = self._window(t) + 1
        return self.start_s[i] if i < len(self.start_s) else math.inf
