"""The simulator schedules as the engine does: a tiny model's engine records which requests ran how many tokens in
every step of a trace (chunked prefill, a full batch, prefix-cache hits and preemption all happen), and the
simulator, driving the same Scheduler with a fixed step time, reproduces that schedule step for step."""
from __future__ import annotations

import numpy as np
import pytest

from pernode.price.simulator import ReplicaConfig, simulate_fleet
from pernode.price.workload import RequestTrace
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams
from tiny_model import write_tiny_model

BLOCK_SIZE, NUM_BLOCKS, MAX_SEQS, BUDGET = 16, 14, 4, 48


class FixedStepTime:
    """Every engine step lasts one second, whatever it runs: the simulator's clock then counts engine steps."""

    serving_request_s = 0.0

    def decode_step_s(self, batch_size: int) -> float:
        return 1.0

    def engine_decode_step_s(self, batch_size: int) -> float:
        return 1.0

    def mix_factor(self, num_decodes: int, prompt_tokens: int) -> float:
        return 1.0

    def prefill_s_per_token(self, prompt_len):
        return np.zeros_like(np.asarray(prompt_len, dtype=np.float64))


def _trace(seed: int = 0):
    """Prompts (a third of them share a 40-token system prefix), outputs, and the engine step each arrives at."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(1000, 40_000, 40).tolist()
    prompts, outputs, steps = [], [], []
    step = 0
    for i in range(14):
        own = rng.integers(1000, 40_000, int(rng.integers(4, 80))).tolist()
        prompts.append(shared + own if i % 3 == 0 else own)
        outputs.append(int(rng.integers(2, 30)))
        steps.append(step)
        step += int(rng.integers(1, 6))
    return prompts, outputs, steps


def _engine_schedule(model_dir: str, prompts, outputs, arrival_steps):
    engine = LLMEngine(model=model_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=MAX_SEQS,
                       max_num_batched_tokens=BUDGET, max_model_len=512, enable_prefix_caching=True,
                       device="cpu")
    schedule: list[list[tuple[int, int]]] = []
    schedule_of_engine = engine.scheduler.schedule

    def recording_schedule():  # the test hook: every step's (request, new tokens), as the scheduler chose them
        batch = schedule_of_engine()
        schedule.append([(int(r.request_id), n) for r, n in zip(batch.requests, batch.num_new_tokens)])
        return batch

    engine.scheduler.schedule = recording_schedule
    preemptions = {}
    step = 0
    while step <= arrival_steps[-1] or engine.has_unfinished_requests():
        for i, s in enumerate(arrival_steps):
            if s == step:
                params = SamplingParams(temperature=0.0, max_tokens=outputs[i], ignore_eos=True)
                engine.add_request(str(i), prompts[i], params)
        for out in engine.step():
            assert out.error is None, out
        for r in engine.scheduler.running:
            preemptions[int(r.request_id)] = r.num_preemptions
        step += 1
        assert schedule[-1] or step > arrival_steps[-1], "the engine idled before the last arrival"
    return [s for s in schedule if s], engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("seed", [0, 1])
def test_simulator_reproduces_the_engines_schedule_step_by_step(tiny_dir, seed):
    prompts, outputs, arrival_steps = _trace(seed)
    engine_schedule, engine = _engine_schedule(tiny_dir, prompts, outputs, arrival_steps)
    # The trace exercises what the rule is about: chunks, a full batch, prefix hits and preemption.
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.stats.hits_tokens > 0
    assert any(sum(n for _, n in step) == BUDGET for step in engine_schedule)
    assert any(len(step) == MAX_SEQS for step in engine_schedule)

    # A request added before engine step k arrives half a step before the simulator's step k begins.
    arrival_s = np.array([0.0] + [s - 0.5 for s in arrival_steps[1:]])
    trace = RequestTrace(arrival_s, np.array([len(p) for p in prompts]), np.array(outputs), prompt_token_ids=prompts)
    config = ReplicaConfig(FixedStepTime(), MAX_SEQS, NUM_BLOCKS * BLOCK_SIZE, BUDGET, BLOCK_SIZE)
    res = simulate_fleet(trace, config, 1, record_schedule=True)
    sim_schedule = [step for _, step in res.schedules[0]]
    assert len(sim_schedule) == len(engine_schedule)
    for k, (sim_step, engine_step) in enumerate(zip(sim_schedule, engine_schedule)):
        assert sim_step == engine_step, f"step {k}"
    assert int(res.preemptions.sum()) == engine.scheduler.num_preemptions
    # Steps are one second each and back to back: step k starts at k (the first arrival is at 0).
    starts = [t for t, _ in res.schedules[0]]
    assert starts == pytest.approx(np.arange(len(starts)))


def test_without_token_ids_prompts_never_share_blocks():
    """A synthetic trace has lengths only: every prompt is taken as unique, so no prefix-cache hit is invented."""
    n = 6
    trace = RequestTrace(np.arange(n, dtype=float) * 0.1, np.full(n, 64), np.full(n, 4))
    res = simulate_fleet(trace, ReplicaConfig(FixedStepTime(), 4, 4096, 512, 16), 1, record_schedule=True)
    first_steps = {}
    for _, step in res.schedules[0]:
        for rid, tokens in step:
            first_steps.setdefault(rid, tokens)
    assert all(tokens == 64 for tokens in first_steps.values())  # each computes its whole prompt
