"""Each validated figure against its target, and whose miss it is (jobs/validate/verdict.py)."""
from __future__ import annotations

from pernode.jobs.validate.verdict import (MODEL, NODE_MOVED, OUTSIDE, WITHIN, describe_verdicts, verdicts,
                                          within_target)


def _errors(**over) -> dict:
    base = {"ttft_p50_ms": 1.0, "tpot_p50_ms": -2.0, "goodput_rps": 0.1, "ttft_p99_ms": -15.0, "tpot_p99_ms": 19.9}
    return {**base, **over}


def test_a_target_is_10_percent_on_p50s_and_goodput_and_20_on_p99s():
    assert within_target("tpot_p50_ms", -10.0) and not within_target("tpot_p50_ms", 10.1)
    assert within_target("ttft_p99_ms", 19.9) and not within_target("ttft_p99_ms", -20.5)
    assert within_target("goodput_rps", None) is None


def test_a_miss_is_the_nodes_when_the_run_at_its_own_speed_is_within_target():
    report = {"error_pct_same_trace": _errors(tpot_p50_ms=40.0),
              "error_pct_anchored": _errors(ttft_p50_ms=12.0, tpot_p50_ms=25.1),
              "error_pct_at_run_speed": _errors(ttft_p50_ms=11.0, tpot_p50_ms=11.0),
              "error_pct_at_run_speed_by_window": _errors(ttft_p50_ms=10.5, tpot_p50_ms=1.4)}
    found = verdicts(report)
    assert found["ttft_p50_ms"] == (MODEL, 12.0, 10.5)  # outside even at the run's own speed, window by window
    assert found["tpot_p50_ms"] == (NODE_MOVED, 25.1, 1.4)
    assert found["tpot_p99_ms"] == (WITHIN, 19.9, 19.9) and len(found) == 5
    (line,) = describe_verdicts(report)
    assert "prediction: anchored" in line and "TPOT p50 +25.1%: the node moved (+1.4% at the run's own speed)" in line
    assert "TTFT p99 -15.0%: within target;" in line


def test_without_an_anchor_the_same_trace_is_judged_and_without_figures_nothing():
    report = {"error_pct_same_trace": _errors(goodput_rps=-30.0), "error_pct_anchored": None}
    assert verdicts(report)["goodput_rps"] == (OUTSIDE, -30.0, None)  # no run speed: whose miss is not known
    assert "prediction: same trace" in describe_verdicts(report)[0]
    assert verdicts({}) == {} and describe_verdicts({}) == []
