"""The typed `bench serve` result: its JSON keeps vLLM's key names in today's layout and reads back equal."""
import math

import pytest

from pernode.measure.bench.bench_result import BenchResult, LatencyStats, RequestRecord, ServingMetrics
from pernode.measure.bench.serving_metrics import RequestTimeline, compute_serving_metrics, per_request_records
from pernode.slo import SLO

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def a_result(request_rate: float = math.inf) -> BenchResult:
    timelines = [RequestTimeline(index=0, send_time_s=0.0, chunk_times_s=[0.1, 0.12, 0.15], prompt_tokens=10),
                 RequestTimeline(index=1, send_time_s=0.2, chunk_times_s=[0.5], prompt_tokens=20, output_tokens=1),
                 RequestTimeline(index=2, send_time_s=0.3, success=False, error="HTTP 500: boom")]
    metrics = compute_serving_metrics(timelines, 1.0, SLO.parse("ttft_ms=200"), PERCENTILES)
    return BenchResult(started_at="2025-01-01T00:00:00+00:00", base_url="http://127.0.0.1:8000", model="m",
                       endpoint="completions", dataset="random", dataset_path=None, num_prompts=3,
                       request_rate=request_rate, burstiness=1.0, max_concurrency=2, seed=0, ignore_eos=True,
                       percentiles=PERCENTILES, metrics=ServingMetrics.from_dict(metrics, PERCENTILES),
                       notes=("a note",),
                       per_request=tuple(RequestRecord.from_dict(r) for r in per_request_records(timelines)))


def test_json_layout_and_round_trip(tmp_path):
    result = a_result()
    d = result.to_dict()
    assert list(d)[:14] == ["kind", "started_at", "base_url", "model", "endpoint", "dataset", "dataset_path",
                            "num_prompts", "request_rate", "burstiness", "max_concurrency", "seed", "ignore_eos",
                            "percentiles"]
    assert list(d)[-2:] == ["notes", "per_request"]
    assert d["kind"] == "bench_serve" and d["request_rate"] == "inf"
    assert (d["completed"], d["failed"], d["good_requests"]) == (2, 1, 1)
    assert d["failed_requests"] == [{"index": 2, "error": "HTTP 500: boom"}]
    assert d["slo"] == {"ttft_ms": 200.0} and d["request_goodput_per_s"] == pytest.approx(1.0)
    assert d["p99_9_ttft_ms"] == result.metrics.ttft.percentile_ms(99.9)
    assert d["median_tpot_ms"] == pytest.approx(25.0) and d["p50_tpot_ms"] == pytest.approx(25.0)
    assert d["per_request"][0]["itl_s"] == pytest.approx([0.02, 0.03])
    assert BenchResult.from_dict(d) == result
    assert BenchResult.load(result.save(tmp_path / "r.json")) == result
    finite = a_result(request_rate=2.5)
    assert BenchResult.from_dict(finite.to_dict()) == finite and finite.to_dict()["request_rate"] == 2.5


def test_latency_stats_without_data():
    stats = LatencyStats(None, None, None, ((99.0, None),))
    assert stats.to_dict("ttft") == {"mean_ttft_ms": None, "median_ttft_ms": None, "std_ttft_ms": None,
                                     "p99_ttft_ms": None}
    assert LatencyStats.from_dict(stats.to_dict("ttft"), "ttft", (99.0,)) == stats
    with pytest.raises(KeyError, match="percentile 50"):
        stats.percentile_ms(50)


def test_reading_something_else_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="kind='fleet_validate'"):
        BenchResult.from_dict({"kind": "fleet_validate"})
    d = a_result().to_dict()
    del d["p99_tpot_ms"]
    with pytest.raises(ValueError, match="p99_tpot_ms is missing"):
        BenchResult.from_dict(d)
    with pytest.raises(ValueError, match="nope.json: cannot read it"):
        BenchResult.load(tmp_path / "nope.json")
