"""Wall and CPU time of an engine's steps, counted as they run.

A step's wall time beyond its thread's CPU time is time the stepping thread did not run: waiting for the core
(another runnable thread or process on it) or blocked (in a server: for the GIL, held by the event loop's thread
while it parses, tokenizes or streams). Neither shows in a profile that steps an engine alone, so a server's
`pernode:engine_step_seconds` against `pernode:engine_step_cpu_seconds` (its /metrics) and an in-process engine's
clock over the same work tell whether serving slows the steps themselves (`benchmarks/engine_step_waits.py`).
Reading two clocks per step costs about a microsecond; a step takes milliseconds.

The clock also keeps the last `keep` steps one by one with what each held (its decodes, each prompt chunk's tokens
with the length of its prompt, whether the engine was idle before it, and the time since the step before ended): set against a step-time model step by step, they give the engine's speed
against its profile at any load, where summed busy time near capacity only says the engine was busy
(jobs/validate/speed_anchor.py; the server's GET /metrics/steps).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, NamedTuple, TypeVar

T = TypeVar("T")
KEEP_STEPS = 16384  # about 5 minutes of steps at 20 ms; a record is a few hundred bytes


class StepShape(NamedTuple):
    """What one step computed: requests decoding one token each, and prompt chunks as (tokens, prompt length)."""

    decodes: int
    chunks: tuple[tuple[int, int], ...]


def step_shape(batch) -> StepShape:
    """A scheduled batch's shape: a request whose every token but the last is computed decodes; any other runs a
    chunk of its prompt (or, after a preemption, of its prompt and output so far: the length it recomputes)."""
    decodes, chunks = 0, []
    for request, n in zip(batch.requests, batch.num_new_tokens):
        if request.num_computed_tokens >= request.num_tokens - 1:
            decodes += 1
        else:
            chunks.append((int(n), request.num_tokens))
    return StepShape(decodes, tuple(chunks))


class StepRecord(NamedTuple):
    index: int  # 0 for the clock's first step
    wall_s: float
    cpu_s: float
    decodes: int
    chunks: tuple[tuple[int, int], ...]
    from_idle: bool  # the engine had nothing to run before it: its caches start cold
    gap_s: float  # since the previous step ended: the loop's own work between steps, or waiting for requests


class StepClock:
    """Steps run, their summed wall seconds and the stepping thread's summed CPU seconds inside them; and the last
    `keep` steps one by one."""

    def __init__(self, keep: int = KEEP_STEPS) -> None:
        # one tuple, replaced whole: a reader on another thread never sees a half-made update
        self._reading: tuple[int, float, float] = (0, 0.0, 0.0)
        self._records: deque[StepRecord] = deque(maxlen=keep)
        self._lock = threading.Lock()  # a reader copies the records while the stepping thread appends
        self._last_end: float | None = None

    def run(self, step: Callable[[], T], shape: Callable[[], StepShape | None] | None = None,
            from_idle: bool = False) -> T:
        """Run one step on the calling thread and count it; `shape`, read after the step, says what it held."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        result = step()
        cpu1, wall1 = time.thread_time(), time.perf_counter()
        steps, wall_s, cpu_s = self._reading
        self._reading = (steps + 1, wall_s + (wall1 - wall0), cpu_s + (cpu1 - cpu0))
        held = shape() if shape is not None else None
        gap_s = wall0 - self._last_end if self._last_end is not None else 0.0
        self._last_end = wall1
        if held is not None:
            with self._lock:
                self._records.append(StepRecord(steps, wall1 - wall0, cpu1 - cpu0, held.decodes, held.chunks,
                                                from_idle, gap_s))
        return result

    def reading(self) -> tuple[int, float, float]:
        """(steps, wall seconds, CPU seconds) so far."""
        return self._reading

    def records_from(self, first: int) -> list[StepRecord]:
        """The kept steps whose index is `first` or later (older ones may have left the window)."""
        with self._lock:
            return [r for r in self._records if r.index >= first]
