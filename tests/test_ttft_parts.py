"""Where a validation's TTFT goes: the server's histograms scraped around the run, set beside the simulator's split
of the same trace."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pernode.jobs.validate.ttft_parts import describe_ttft_parts, parse_server_timing, ttft_parts
from pernode.price.replica import ReplicaConfig
from pernode.price.simulator import simulate_fleet
from pernode.price.step_time import StepTimeModel
from pernode.price.workload import RequestTrace
from pernode.serve.server.metrics import ServerMetrics


def test_the_servers_histograms_are_read_from_its_own_exposition():
    metrics = ServerMetrics("m")
    before = parse_server_timing(metrics.exposition().decode())
    for ttft, queue in ((0.120, 0.020), (0.180, 0.040)):
        metrics._ttft.observe(ttft)
        metrics._queue_time.observe(queue)
    after = parse_server_timing(metrics.exposition().decode())
    assert before["ttft_count"] == 0 and after["ttft_count"] == 2 and after["queue_count"] == 2
    assert after["ttft_sum"] == pytest.approx(0.300) and after["queue_sum"] == pytest.approx(0.060)


def test_measured_and_predicted_ttft_split_into_the_same_three_parts():
    # The server saw 2 requests: TTFT 150 ms on average, 30 ms of it queued; the client saw 170 ms.
    before = {"ttft_sum": 1.0, "ttft_count": 10, "queue_sum": 0.5, "queue_count": 10}
    after = {"ttft_sum": 1.3, "ttft_count": 12, "queue_sum": 0.56, "queue_count": 12}
    bench = SimpleNamespace(per_request=[SimpleNamespace(success=True, ttft_s=0.160),
                                         SimpleNamespace(success=True, ttft_s=0.180),
                                         SimpleNamespace(success=False, ttft_s=None)])
    # Predicted: one request alone reaches the engine 5 ms late and prefills 100 tokens at 1000 tokens/s.
    model = StepTimeModel.from_profile({"decode": [{"batch_size": 1, "step_s": 0.01}],
                                        "prefill": [{"prompt_len": 100, "prefill_tokens_per_s": 1000.0}],
                                        "serving_path": {"request_s": 0.005, "token_s": 0.0}})
    sim = simulate_fleet(RequestTrace(np.array([0.0]), np.array([100]), np.array([4])),
                         ReplicaConfig(model, 4, 10_000, 512), 1)
    parts = ttft_parts(before, after, bench, sim, model.serving_request_s)
    assert parts["measured"] == {"ttft_ms": pytest.approx(170.0), "way_in_and_out_ms": pytest.approx(20.0),
                                 "queue_ms": pytest.approx(30.0), "first_steps_ms": pytest.approx(120.0),
                                 "server_requests": 2}
    assert parts["predicted"] == {"ttft_ms": pytest.approx(105.0), "way_in_and_out_ms": pytest.approx(5.0),
                                  "queue_ms": pytest.approx(0.0), "first_steps_ms": pytest.approx(100.0)}
    lines = describe_ttft_parts(parts)
    assert lines[0] == "TTFT (mean): measured 170.0 ms / predicted 105.0 ms (+65.0 ms)"
    assert "queue to admission: measured 30.0 ms / predicted 0.0 ms (+30.0 ms)" in lines
    assert ttft_parts(None, after, bench, sim)["measured"] is None  # /metrics did not answer: no split
