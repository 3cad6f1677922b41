"""Serving metrics on synthetic timelines whose answers are worked out by hand below."""
import math

import pytest

from pernode.measure.bench.serving_metrics import (RequestTimeline, compute_serving_metrics, parse_slo,
                                             per_request_records, summarize_ms)
from pernode.slo import SLO


def timelines():
    return [
        # A: 4 content chunks, no usage -> 4 output tokens. TTFT 100 ms, ITL 20/30/50 ms, E2E 200 ms,
        #    TPOT = (200 - 100) / (4 - 1) = 33.33 ms.
        RequestTimeline(index=0, send_time_s=0.0, chunk_times_s=[0.1, 0.12, 0.15, 0.2], prompt_tokens=10),
        # B: 2 chunks but usage says 5 tokens. TTFT 300 ms, ITL 100 ms, E2E 400 ms, TPOT = 100 / 4 = 25 ms.
        RequestTimeline(index=1, send_time_s=1.0, chunk_times_s=[1.3, 1.4], prompt_tokens=20, output_tokens=5),
        # C: one token. TTFT = E2E = 200 ms, no TPOT (and TPOT counts as 0 for goodput).
        RequestTimeline(index=2, send_time_s=0.5, chunk_times_s=[0.7], prompt_tokens=30),
        # D: the server failed it.
        RequestTimeline(index=3, send_time_s=0.6, success=False, error="HTTP 500: boom", prompt_tokens=40),
        # E: "succeeded" without any content: no TTFT exists, so it is a failure too.
        RequestTimeline(index=4, send_time_s=0.7, prompt_tokens=50),
    ]


def test_counts_and_throughputs():
    m = compute_serving_metrics(timelines(), duration_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (5, 3, 2)
    assert m["failed_requests"] == [{"index": 3, "error": "HTTP 500: boom"},
                                    {"index": 4, "error": "stream ended without any content chunk"}]
    assert m["total_input_tokens"] == 10 + 20 + 30  # failed requests add no tokens (as in vLLM)
    assert m["total_output_tokens"] == 4 + 5 + 1
    assert m["request_throughput_per_s"] == pytest.approx(3 / 2.0)
    assert m["output_throughput_tok_s"] == pytest.approx(10 / 2.0)
    assert m["total_token_throughput_tok_s"] == pytest.approx(70 / 2.0)
    assert m["request_goodput_per_s"] is None  # no SLO given


def test_latency_statistics():
    m = compute_serving_metrics(timelines(), duration_s=2.0)
    # TTFT [100, 300, 200] ms: mean 200, median 200, population std sqrt((100^2 + 100^2 + 0) / 3) = 81.65;
    # numpy's linear percentile on sorted [100, 200, 300]: p90 at rank 1.8 -> 280, p99 at rank 1.98 -> 298.
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(20000 / 3))
    assert m["p90_ttft_ms"] == pytest.approx(280.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)
    # TPOT [33.33, 25] ms (C has one token, so none): mean 29.17, p90 = 25 + 0.9 * 8.33 = 32.5.
    assert m["mean_tpot_ms"] == pytest.approx((100 / 3 + 25) / 2)
    assert m["p90_tpot_ms"] == pytest.approx(32.5)
    # ITL pooled [20, 30, 50, 100] ms: mean 50, median 40, p90 at rank 2.7 -> 50 + 0.7 * 50 = 85, p99 -> 98.5.
    assert m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p90_itl_ms"] == pytest.approx(85.0)
    assert m["p99_itl_ms"] == pytest.approx(98.5)
    # E2E [200, 400, 200] ms: mean 266.7, median 200, p90 at rank 1.8 of [200, 200, 400] -> 360.
    assert m["mean_e2el_ms"] == pytest.approx(800 / 3)
    assert m["median_e2el_ms"] == pytest.approx(200.0)
    assert m["p90_e2el_ms"] == pytest.approx(360.0)


def test_goodput():
    # ttft <= 250 and tpot <= 30: A fails TPOT (33.3), B fails TTFT (300), C passes (TPOT counts 0) -> 1 good.
    m = compute_serving_metrics(timelines(), 2.0, slo=SLO.from_dict({"ttft_ms": 250, "tpot_ms": 30}))
    assert m["good_requests"] == 1
    assert m["slo"] == {"ttft_ms": 250.0, "tpot_ms": 30.0}  # the result JSON keeps the user's milliseconds
    assert m["request_goodput_per_s"] == pytest.approx(0.5)
    # Adding e2e <= 150 ms fails C as well.
    m = compute_serving_metrics(timelines(), 2.0, slo=parse_slo("ttft_ms=250,tpot_ms=30,e2e_ms=150"))
    assert m["good_requests"] == 0
    # A generous SLO keeps every completed request.
    m = compute_serving_metrics(timelines(), 2.0, slo=SLO(e2e_s=1.0))
    assert m["good_requests"] == 3


def test_parse_slo_errors_name_the_field():
    assert parse_slo("ttft_ms=500, tpot_ms=50") == SLO(ttft_s=0.5, tpot_s=0.05)
    assert parse_slo(None) is None and parse_slo("") is None
    with pytest.raises(ValueError, match="^slo="):  # the setting's name, which the CLI turns into --slo
        parse_slo("x")
    with pytest.raises(ValueError, match="ttft_s=1"):
        parse_slo("ttft_s=1")
    with pytest.raises(ValueError, match="tpot_ms"):
        parse_slo("tpot_ms=-3")
    with pytest.raises(ValueError, match="e2e_ms"):
        parse_slo("e2e_ms=fast")


def test_empty_and_all_failed():
    m = compute_serving_metrics([RequestTimeline(index=0, send_time_s=0.0, success=False, error="timeout")], 1.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["mean_ttft_ms"] is None and m["p99_e2el_ms"] is None  # no data is not "0 ms"
    assert m["output_throughput_tok_s"] == 0.0
    with pytest.raises(ValueError, match="duration_s"):
        compute_serving_metrics([], 0.0)
    assert summarize_ms([0.001], "x", percentiles=(99.9,))["p99_9_x_ms"] == pytest.approx(1.0)


def test_per_request_records():
    rows = per_request_records(timelines())
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["ttft_s"] == pytest.approx(0.1) and rows[0]["output_tokens"] == 4
    assert rows[1]["tpot_s"] == pytest.approx(0.025)
    assert rows[3]["success"] is False and rows[3]["error"] == "HTTP 500: boom" and rows[3]["ttft_s"] is None
    assert rows[4]["success"] is False
