"""The fleet simulator: held to a plain step-by-step reference, to Little's law and to the capacity formula."""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from pernode.price.queueing import replica_capacity_rps, time_average_in_system
from pernode.price.simulator import ReplicaConfig, simulate_fleet
from pernode.slo import SLO
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import LengthDist, RequestTrace, Workload


class _Req:
    def __init__(self, rid, prompt, output, s_per_token):
        self.rid, self.prompt, self.output, self.spt = rid, prompt, output, s_per_token
        self.num_tokens, self.computed, self.sampled, self.decoding, self.preemptions = prompt, 0, 0, False, 0


def reference_simulate(trace: RequestTrace, cfg: ReplicaConfig, num_replicas: int, policy: str):
    """One event per engine step, every token counted: slow and obviously the engine's scheduling rule.

    A line-by-line copy of serve/engine/scheduler.py with one-token KV blocks: running requests in admission order
    each get min(uncomputed tokens, budget left); when the KV cannot hold them, the newest running request is
    preempted (KV freed, back to the head of the queue to recompute); then, if nothing was preempted, waiting
    requests are admitted FIFO while the batch and the KV allow their next chunk.
    """
    n = len(trace)
    spt = cfg.step_model.prefill_s_per_token(trace.prompt_tokens.astype(float)).tolist()
    reqs = [_Req(i, int(p), int(o), spt[i]) for i, (p, o) in enumerate(zip(trace.prompt_tokens, trace.output_tokens))]
    first, finish = [math.nan] * n, [math.nan] * n
    waiting = [deque() for _ in range(num_replicas)]
    running = [[] for _ in range(num_replicas)]
    kv = [0] * num_replicas
    outstanding = [0] * num_replicas
    step_end = [None] * num_replicas  # (end time, [(request, new tokens)])
    rr = 0

    def preempt(r, victim):
        kv[r] -= victim.computed
        victim.computed, victim.decoding = 0, False
        victim.preemptions += 1
        victim.spt = float(cfg.step_model.prefill_s_per_token(victim.num_tokens))
        waiting[r].appendleft(victim)

    def start(r, t):
        budget, scheduled, preempted = cfg.token_budget, [], False
        i = 0
        while i < len(running[r]) and budget > 0:
            req = running[r][i]
            new = min(req.num_tokens - req.computed, budget)
            while kv[r] + new > cfg.kv_max_tokens:
                victim = running[r].pop()  # the newest request gives its KV back
                preempt(r, victim)
                preempted = True
                if victim is req:
                    break
            else:
                kv[r] += new
                scheduled.append((req, new))
                budget -= new
                i += 1
                continue
            break
        while waiting[r] and budget > 0 and not preempted and len(running[r]) < cfg.max_batch:
            req = waiting[r][0]
            new = min(req.num_tokens, budget)
            if kv[r] + new > cfg.kv_max_tokens:
                break
            waiting[r].popleft()
            kv[r] += new
            running[r].append(req)
            scheduled.append((req, new))
            budget -= new
        if not scheduled:
            step_end[r] = None
            return
        decodes = sum(1 for req, _ in scheduled if req.decoding)
        dur = cfg.step_model.decode_step_s(decodes) + sum(new * req.spt for req, new in scheduled if not req.decoding)
        step_end[r] = (t + dur, scheduled)

    i = 0
    while True:
        ends = [(s[0], r) for r, s in enumerate(step_end) if s is not None]
        t_step, r_step = min(ends) if ends else (math.inf, -1)
        if i < n and trace.arrival_s[i] <= t_step:
            t = float(trace.arrival_s[i])
            if policy == "round_robin":
                r = i % num_replicas
            else:
                low = min(outstanding)
                r = rr
                while outstanding[r] != low:
                    r = (r + 1) % num_replicas
                rr = (r + 1) % num_replicas
            waiting[r].append(reqs[i])
            outstanding[r] += 1
            i += 1
            if step_end[r] is None:
                start(r, t)
            continue
        if r_step < 0:
            break
        t, scheduled = step_end[r_step]
        r = r_step
        for req, new in scheduled:
            req.computed += new
            if req.computed < req.num_tokens:
                continue  # a prompt chunk
            req.sampled += 1
            if math.isnan(first[req.rid]):
                first[req.rid] = t
            if req.sampled == req.output:
                finish[req.rid] = t
                running[r].remove(req)
                kv[r] -= req.computed
                outstanding[r] -= 1
            else:
                req.num_tokens += 1
                req.decoding = True
        start(r, t)
    return np.asarray(first), np.asarray(finish), np.asarray([req.preemptions for req in reqs])


STEP = StepTimeModel.from_points({1: 0.010, 4: 0.012, 16: 0.020}, {32: 2000.0, 256: 5000.0})


@pytest.mark.parametrize("policy", ["least_outstanding", "round_robin"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_step_by_step_reference(policy, seed):
    # Short budget and tight KV so that chunked prefill, batch caps, KV blocking and preemption all happen.
    wl = Workload(60.0, LengthDist.uniform(1, 300), LengthDist.uniform(1, 40), burstiness=0.5)
    trace = wl.generate(400, seed=seed)
    cfg = ReplicaConfig(STEP, max_batch=6, kv_max_tokens=900, token_budget=128, block_size=1)
    res = simulate_fleet(trace, cfg, 3, policy)
    first, finish, preemptions = reference_simulate(trace, cfg, 3, policy)
    np.testing.assert_allclose(res.first_token_s, first, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.finish_s, finish, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(res.preemptions, preemptions)
    assert preemptions.sum() > 0  # the KV is tight enough that preemption is exercised


def test_single_request_alone_by_hand():
    # 100-token prompt at 2000..5000 tok/s interpolated at 100 tokens: 2000 + (100-32)/(256-32)*3000 = 2910.71 tok/s.
    # TTFT = one step with no decodes and 100 prompt tokens = 100 / 2910.71 s. Then 9 decode steps at batch 1.
    trace = RequestTrace(np.array([1.0]), np.array([100]), np.array([10]))
    res = simulate_fleet(trace, ReplicaConfig(STEP, 4, 10_000, 512), 1)
    rate = 2000 + (100 - 32) / (256 - 32) * 3000
    assert res.ttft_s[0] == pytest.approx(100 / rate, rel=1e-12)
    assert res.e2e_s[0] == pytest.approx(100 / rate + 9 * 0.010, rel=1e-12)
    assert res.tpot_s[0] == pytest.approx(0.010, rel=1e-12)


def test_littles_law_on_simulated_trace():
    wl = Workload(30.0, LengthDist.uniform(16, 256), LengthDist.uniform(8, 64))
    trace = wl.generate(6000, seed=3)
    res = simulate_fleet(trace, ReplicaConfig(STEP, 12, 20_000, 256), 3)
    sojourn = res.e2e_s
    lam_eff = res.num_requests / res.span_s
    # L from the simulator's own running count; L from sweeping the recorded timestamps; lambda W from sojourns.
    l_internal = res.mean_in_system()
    l_sweep = time_average_in_system(res.arrival_s, res.finish_s)
    assert l_internal == pytest.approx(l_sweep, rel=1e-9)
    assert l_internal == pytest.approx(lam_eff * sojourn.mean(), rel=1e-9)
    # And against the offered rate, the law's usual form: close over a long run.
    assert l_internal == pytest.approx(wl.rate_rps * sojourn.mean(), rel=0.03)


def test_saturated_throughput_matches_capacity_formula():
    # Constant 20 ms step, 10k tok/s prefill; everyone arrives at once so the batch stays full.
    step = StepTimeModel.from_points({1: 0.02, 64: 0.02}, {16: 10_000.0, 4096: 10_000.0})
    wl = Workload(1.0, LengthDist.fixed(200), LengthDist.fixed(50))
    n = 3000
    trace = RequestTrace(np.zeros(n), np.full(n, 200), np.full(n, 50))
    res = simulate_fleet(trace, ReplicaConfig(step, 32, 1_000_000, 4096), 1)
    # Capacity = 32 / (50 * 0.02 + 32 * 200 / 10000) = 32 / 1.64 = 19.51 req/s.
    assert replica_capacity_rps(step, 32, wl) == pytest.approx(32 / 1.64)
    assert n / res.span_s == pytest.approx(32 / 1.64, rel=0.03)


def test_more_replicas_never_worse_on_the_same_trace():
    wl = Workload(40.0, LengthDist.uniform(32, 256), LengthDist.uniform(16, 128), burstiness=0.7)
    trace = wl.generate(1200, seed=5)
    slo = SLO(ttft_s=0.3, tpot_s=0.02)
    for policy in ("least_outstanding", "round_robin"):
        prev_att, prev_p99 = -1.0, math.inf
        for n in range(1, 9):
            res = simulate_fleet(trace, ReplicaConfig(STEP, 16, 50_000, 512), n, policy)
            att, p99 = res.attainment(slo), res.percentiles_s("ttft")["p99"]
            assert att >= prev_att - 1e-12, (policy, n)
            assert p99 <= prev_p99 + 1e-12, (policy, n)
            prev_att, prev_p99 = att, p99


def test_planner_sized_run_on_8_replicas_finishes_every_request():
    wl = Workload(60.0, LengthDist.uniform(128, 512), LengthDist.uniform(64, 256))
    trace = wl.generate(4000, seed=0)
    step = StepTimeModel.from_points({1: 0.02, 32: 0.03, 128: 0.06}, {128: 4000.0, 2048: 6000.0})
    res = simulate_fleet(trace, ReplicaConfig(step, 64, 100_000, 2048), 8)
    assert res.num_requests == 4000 and np.all(res.finish_s >= res.first_token_s)
    assert np.all(res.first_token_s > res.arrival_s)
    # Decode runs are single events: far fewer events than the ~680k decode tokens of the trace.
    assert res.num_events < int(trace.output_tokens.sum()) // 20


def test_bad_inputs_name_the_field():
    trace = RequestTrace(np.array([0.0]), np.array([100]), np.array([10]))
    cfg = ReplicaConfig(STEP, 4, 1000, 64)
    with pytest.raises(ValueError, match="num_replicas"):
        simulate_fleet(trace, cfg, 0)
    with pytest.raises(ValueError, match="policy"):
        simulate_fleet(trace, cfg, 1, policy="random")
    with pytest.raises(ValueError, match="kv_max_tokens"):
        simulate_fleet(trace, ReplicaConfig(STEP, 4, 50, 64), 1)
    with pytest.raises(ValueError, match="max_batch"):
        ReplicaConfig(STEP, 64, 1000, 64)
    with pytest.raises(ValueError, match="sorted"):
        simulate_fleet(RequestTrace(np.array([1.0, 0.0]), np.array([5, 5]), np.array([5, 5])), cfg, 1)
    with pytest.raises(ValueError, match="smallest output 0"):
        simulate_fleet(RequestTrace(np.array([0.0]), np.array([5]), np.array([0])), cfg, 1)


def test_kv_limited_replica_preempts_the_newest_request():
    # Worked by hand: 10 ms decode steps at any batch, 1 ms per prompt token, 40 tokens of KV, two requests of
    # 10 prompt + 20 output tokens arriving together.
    #   t = 0.01  A's prompt computed (its first token); B waits for the step to end.
    #   t = 0.03  A decodes and B's prompt rides along (10 + 10 ms): KV 11 + 10 = 21 tokens.
    #   t = 0.12  nine steps, two tokens each: KV 39; the next step needs 2 more and only 1 is free.
    #   t = 0.13  the engine's rule: the newest (B, holding 19 tokens, 10 sampled) is preempted; A steps alone.
    #             B may not come back yet: recomputing its 20 tokens beside A's 21 + 1 would need 42.
    #   t = 0.21  A's 20th token: A finishes and frees its KV.
    #   t = 0.23  B recomputes prompt + 10 sampled tokens (20 ms) and samples its 11th; t = 0.32 its 20th.
    step = StepTimeModel.from_points({1: 0.010, 8: 0.010}, {16: 1000.0, 1024: 1000.0})
    trace = RequestTrace(np.zeros(2), np.array([10, 10]), np.array([20, 20]))
    res = simulate_fleet(trace, ReplicaConfig(step, max_batch=4, kv_max_tokens=40, token_budget=64, block_size=1), 1)
    assert res.preemptions.tolist() == [0, 1]
    np.testing.assert_allclose(res.first_token_s, [0.01, 0.03], atol=1e-12)
    np.testing.assert_allclose(res.finish_s, [0.21, 0.32], atol=1e-12)
    assert res.summary(SLO(ttft_s=1.0))["preemptions"] == 1
    # With room for both nobody is preempted: A finishes at the same 0.21 s (the older request never waits) and
    # B at 0.22 s; preempted, B lost 100 ms: it sat out A's last 9 steps and recomputed for 20 ms, not 10.
    roomy = simulate_fleet(trace, ReplicaConfig(step, max_batch=4, kv_max_tokens=60, token_budget=64, block_size=1), 1)
    assert roomy.preemptions.tolist() == [0, 0]
    np.testing.assert_allclose(roomy.finish_s, [0.21, 0.22], atol=1e-12)
