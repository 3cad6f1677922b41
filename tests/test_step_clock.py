"""The engine's step clock: steps counted with their wall and CPU seconds, exported on the server's /metrics and
read back by the client's parser."""
from __future__ import annotations

import threading
from types import SimpleNamespace

from pernode.measure.bench.server_timing import parse_engine_steps
from pernode.serve.engine.llm_engine import EngineStats
from pernode.serve.engine.step_clock import StepClock
from pernode.serve.server.metrics import ServerMetrics


def _spin(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


def test_a_step_that_computes_is_counted_with_its_cpu_inside_its_wall_time():
    clock = StepClock()
    assert clock.run(lambda: _spin(200_000)) == sum(range(200_000))
    clock.run(lambda: _spin(200_000))
    steps, wall_s, cpu_s = clock.reading()
    assert steps == 2
    assert 0.0 < cpu_s <= wall_s + 1e-3  # the thread's CPU clock ticks coarser than perf_counter


def test_a_step_that_waits_on_a_lock_pays_wall_time_but_no_cpu():
    # The stepping thread blocks on a lock another thread holds (as the engine waits for the GIL): wall, not CPU.
    clock = StepClock()
    lock, held = threading.Lock(), threading.Event()

    def holder():
        with lock:
            held.set()
            threading.Event().wait(0.2)

    t = threading.Thread(target=holder)
    t.start()
    held.wait()

    def step():
        with lock:
            return None

    clock.run(step)
    t.join()
    steps, wall_s, cpu_s = clock.reading()
    assert steps == 1 and wall_s >= 0.1 and cpu_s < wall_s / 2


def test_the_server_exports_its_step_clock_and_the_client_reads_it_back():
    metrics = ServerMetrics("m")
    assert parse_engine_steps(metrics.exposition().decode()) is None  # not serving yet
    stats = EngineStats(0, 0, 0.0, 10, 10, 0, 0, 0, 0, 0)
    clock = StepClock()
    metrics.attach(SimpleNamespace(stats=stats, num_waiting=0, step_clock=clock))
    before = parse_engine_steps(metrics.exposition().decode())
    assert before == {"steps": 0.0, "step_wall_s": 0.0, "step_cpu_s": 0.0}
    for _ in range(3):
        clock.run(lambda: _spin(50_000))
    after = parse_engine_steps(metrics.exposition().decode())
    steps, wall_s, cpu_s = clock.reading()
    assert after["steps"] == 3 and after["step_wall_s"] == wall_s and after["step_cpu_s"] == cpu_s
