"""Wall and CPU time of an engine's steps, counted as they run.

A step's wall time beyond its thread's CPU time is time the stepping thread did not run: waiting for the core
(another runnable thread or process on it) or blocked (in a server: for the GIL, held by the event loop's thread
while it parses, tokenizes or streams). Neither shows in a profile that steps an engine alone, so a server's
`pernode:engine_step_seconds` against `pernode:engine_step_cpu_seconds` (its /metrics) and an in-process engine's
clock over the same work tell whether serving slows the steps themselves (`benchmarks/engine_step_waits.py`).
Reading two clocks per step costs about a microsecond; a step takes milliseconds.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class StepClock:
    """Steps run, their summed wall seconds and the stepping thread's summed CPU seconds inside them."""

    def __init__(self) -> None:
        # one tuple, replaced whole: a reader on another thread never sees a half-made update
        self._reading: tuple[int, float, float] = (0, 0.0, 0.0)

    def run(self, step: Callable[[], T]) -> T:
        """Run one step on the calling thread and count it."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        result = step()
        cpu1, wall1 = time.thread_time(), time.perf_counter()
        steps, wall_s, cpu_s = self._reading
        self._reading = (steps + 1, wall_s + (wall1 - wall0), cpu_s + (cpu1 - cpu0))
        return result

    def reading(self) -> tuple[int, float, float]:
        """(steps, wall seconds, CPU seconds) so far."""
        return self._reading
