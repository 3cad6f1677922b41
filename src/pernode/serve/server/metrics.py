"""Prometheus metrics with vLLM's meanings under the `pernode:` prefix, so dashboards carry over.

Gauges and engine counters are read from the engine's latest `EngineStats` at scrape time; latency histograms
and the per-finish-reason counter are fed by the engine thread after every step. Counters gain `_total` in the
exposition, as vLLM's do (`pernode:prompt_tokens_total`).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pernode.serve.engine.llm_engine import EngineStats
from pernode.serve.engine.outputs import FinishReason, RequestOutput

# vLLM's buckets, so percentiles computed from either server line up.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                     240.0, 480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Engine state at scrape time: no copy to keep in sync."""

    def __init__(self, model_name: str, read: Callable[[], tuple | None]):
        self.model_name = model_name
        self.read = read

    def collect(self):
        current = self.read()
        if current is None:  # still loading
            return
        s, base, num_waiting = current[:3]
        clock = current[3] if len(current) > 3 else None
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("pernode:num_requests_running", "Requests in the engine's running batch.", s.num_running)
        yield gauge("pernode:num_requests_waiting", "Requests waiting to be scheduled (queued or preempted).",
                    num_waiting)
        yield gauge("pernode:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
                    s.kv_cache_usage)
        # Counted from when serving began: the engine's totals less what it had done before (the warm-up).
        yield counter("pernode:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries - base.prefix_cache_queries)
        yield counter("pernode:prefix_cache_hits", "Prompt tokens served by the prefix cache.",
                      s.prefix_cache_hits - base.prefix_cache_hits)
        yield counter("pernode:num_preemptions", "Requests preempted to free KV blocks.",
                      s.num_preemptions - base.num_preemptions)
        yield counter("pernode:prompt_tokens", "Prompt tokens scheduled for prefill.",
                      s.prompt_tokens - base.prompt_tokens)
        yield counter("pernode:generation_tokens", "Tokens generated.", s.generation_tokens - base.generation_tokens)
        if s.spec_decode is not None:
            yield from _spec_decode_metrics(s.spec_decode, base.spec_decode, gauge, counter, labels)
        if clock is not None:
            steps, wall_s, cpu_s = clock.reading()
            yield counter("pernode:engine_steps", "Engine steps run.", steps)
            yield counter("pernode:engine_step_seconds", "Wall time of the engine's steps.", wall_s)
            yield counter("pernode:engine_step_cpu_seconds",
                          "The engine thread's CPU time inside its steps (wall beyond it: waiting for the core or "
                          "the GIL).", cpu_s)


def _spec_decode_metrics(spec, base, gauge, counter, labels):
    """vLLM's speculative-decoding series (`vllm:spec_decode_*`), counted from when serving began."""
    drafts = spec.num_drafts - (base.num_drafts if base else 0)
    proposed = spec.num_draft_tokens - (base.num_draft_tokens if base else 0)
    accepted = spec.num_accepted_tokens - (base.num_accepted_tokens if base else 0)
    yield counter("pernode:spec_decode_num_drafts", "Verifications of proposed tokens.", drafts)
    yield counter("pernode:spec_decode_num_draft_tokens", "Proposed tokens verified.", proposed)
    yield counter("pernode:spec_decode_num_accepted_tokens", "Proposed tokens accepted.", accepted)
    per_pos = CounterMetricFamily("pernode:spec_decode_num_accepted_tokens_per_pos",
                                  "Proposed tokens accepted at each position of a proposal.",
                                  labels=["model_name", "position"])
    base_pos = base.accepted_per_position if base else []
    for i, n in enumerate(spec.accepted_per_position):
        per_pos.add_metric(labels + [str(i)], n - (base_pos[i] if i < len(base_pos) else 0))
    yield per_pos
    yield gauge("pernode:spec_decode_draft_acceptance_rate", "Accepted / proposed tokens.",
                accepted / proposed if proposed else 0.0)
    yield gauge("pernode:spec_decode_mean_acceptance_length",
                "Tokens each verification yields (accepted + the target's own).",
                1.0 + accepted / drafts if drafts else 0.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._engine = None
        self._baseline: EngineStats | None = None
        self.registry.register(_EngineStatsCollector(model_name, self._read_engine))
        labels = ["model_name"]
        self.request_success = Counter("pernode:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=self.registry)
        self.ttft = Histogram("pernode:time_to_first_token_seconds", "Arrival to first generated token.",
                              labels, buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.itl = Histogram("pernode:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=ITL_BUCKETS_S, registry=self.registry)
        self.e2e = Histogram("pernode:e2e_request_latency_seconds", "Arrival to the last token.", labels,
                             buckets=REQUEST_BUCKETS_S, registry=self.registry)
        self.queue_time = Histogram("pernode:request_queue_time_seconds", "Arrival to first scheduled.", labels,
                                    buckets=REQUEST_BUCKETS_S, registry=self.registry)
        for reason in FinishReason:
            self.request_success.labels(model_name, reason.value)
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)
        self._e2e = self.e2e.labels(model_name)
        self._queue_time = self.queue_time.labels(model_name)
        self._last_token_s: dict[tuple[str, int], float] = {}  # (request id, sample) -> time of its last token
        self._first_seen: set[str] = set()

    def attach(self, async_engine) -> None:
        self._engine = async_engine
        self._baseline = async_engine.stats

    def _read_engine(self):
        e = self._engine
        return None if e is None else (e.stats, self._baseline, e.num_waiting, getattr(e, "step_clock", None))

    def observe_step(self, outputs: list[RequestOutput], now_s: float) -> None:
        """Called by the engine thread after each step with that step's outputs."""
        for out in outputs:
            rid = out.request_id
            m = out.metrics
            for c in out.outputs:
                if not c.delta_token_ids:
                    continue
                key = (rid, c.index)
                last = self._last_token_s.get(key)
                if last is not None:
                    self._itl.observe(now_s - last)
                self._last_token_s[key] = now_s
            if rid not in self._first_seen and m is not None and m.first_token_s is not None:
                self._first_seen.add(rid)
                self._ttft.observe(m.first_token_s - m.arrival_s)
            if out.finished:
                reason = FinishReason.ERROR if out.error is not None else (out.outputs[0].finish_reason
                                                                           or FinishReason.ABORT)
                self.request_success.labels(self.model_name, reason.value).inc()
                if m is not None:
                    if m.first_scheduled_s is not None:
                        self._queue_time.observe(m.first_scheduled_s - m.arrival_s)
                    if m.finished_s is not None and reason is not FinishReason.ERROR:
                        self._e2e.observe(m.finished_s - m.arrival_s)
                self._first_seen.discard(rid)
                for c in out.outputs:
                    self._last_token_s.pop((rid, c.index), None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
