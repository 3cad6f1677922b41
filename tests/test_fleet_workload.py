"""Workload specs, traces and the step-time model read from a profile."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pernode.price.step_time import StepTimeModel
from pernode.price.max_batch import max_batch_size
from pernode.price.workload import LengthDist, Workload


def test_generation_is_seeded_and_has_the_right_rate():
    wl = Workload(5.0, LengthDist.parse("128:512"), LengthDist.parse("64"))
    a, b = wl.generate(20_000, seed=7), wl.generate(20_000, seed=7)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    gaps = np.diff(a.arrival_s)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # Poisson: CV 1
    assert a.prompt_tokens.min() >= 128 and a.prompt_tokens.max() <= 512
    assert np.all(a.output_tokens == 64)


def test_burstiness_sets_the_coefficient_of_variation():
    gaps = np.diff(Workload(2.0, LengthDist.fixed(1), LengthDist.fixed(1), burstiness=0.25)
                   .generate(40_000, seed=1).arrival_s)
    assert gaps.mean() == pytest.approx(0.5, rel=0.04)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1 / 0.25, rel=0.08)  # CV^2 = 1 / shape


def test_trace_with_counts_and_with_text(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"prompt_tokens": 10, "output_tokens": 3}) + "\n\n"
                 + json.dumps({"prompt": "x" * 41, "max_tokens": 7}) + "\n")
    wl = Workload.from_trace(p, rate_rps=1.0)
    assert list(wl.input_len.values) == [10, 11]  # ceil(41 / 4)
    assert list(wl.output_len.values) == [3, 7]
    assert wl.paired and any("estimated" in n for n in wl.notes)
    tr = wl.generate(200, seed=0)
    pairs = set(zip(tr.prompt_tokens.tolist(), tr.output_tokens.tolist()))
    assert pairs <= {(10, 3), (11, 7)}  # rows stay together
    wl2 = Workload.from_trace(p, rate_rps=1.0, count_tokens=lambda s: 2)
    assert list(wl2.input_len.values) == [10, 2]


def test_trace_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt_tokens": 10, "output_tokens": 3}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        Workload.from_trace(p, 1.0)
    p.write_text(json.dumps({"prompt_tokens": 0, "output_tokens": 3}) + "\n")
    with pytest.raises(ValueError, match="prompt_tokens"):
        Workload.from_trace(p, 1.0)


def test_bad_workload_inputs():
    with pytest.raises(ValueError, match="rate_rps"):
        Workload(0.0, LengthDist.fixed(1), LengthDist.fixed(1))
    with pytest.raises(ValueError, match="burstiness"):
        Workload(1.0, LengthDist.fixed(1), LengthDist.fixed(1), burstiness=-1)
    with pytest.raises(ValueError, match="--input-len"):
        LengthDist.parse("a:b", "--input-len")
    with pytest.raises(ValueError, match="high end"):
        LengthDist.parse("512:128")
    with pytest.raises(ValueError, match=">= 1"):
        LengthDist.parse("0")


def test_step_time_interpolates_and_extrapolates():
    m = StepTimeModel.from_points({1: 0.010, 8: 0.012, 32: 0.020}, {128: 1000.0, 512: 3000.0})
    assert m.decode_step_s(0) == 0.0
    assert m.decode_step_s(20) == pytest.approx(0.012 + 12 / 24 * 0.008)
    assert m.decode_step_s(64) == pytest.approx(0.020 + 32 * 0.008 / 24)  # the last segment's slope carries on
    assert m.prefill_tokens_per_s(320) == pytest.approx(2000.0)
    assert m.prefill_tokens_per_s(4096) == 3000.0  # clamped beyond the longest measured prompt
    assert m.step_s(8, 320) == pytest.approx(0.012 + 320 / 2000)


def test_step_time_picks_decode_points_nearest_the_workload_context():
    prof = {"decode": [{"batch_size": 1, "context_len": 512, "step_s": 0.01},
                       {"batch_size": 8, "context_len": 512, "step_s": 0.02},
                       {"batch_size": 1, "context_len": 2048, "step_s": 0.03},
                       {"batch_size": 8, "context_len": 2048, "step_s": 0.05}],
            "prefill": [{"prompt_len": 128, "prefill_tokens_per_s": 1000.0}]}
    assert StepTimeModel.from_profile(prof, context_tokens=600).decode_step_s(8) == 0.02
    assert StepTimeModel.from_profile(prof, context_tokens=1900).decode_step_s(8) == 0.05


def test_profile_errors_name_the_field():
    with pytest.raises(ValueError, match=r"decode\[1\]\.step_s"):
        StepTimeModel.from_profile({"decode": [{"batch_size": 1, "step_s": 0.1}, {"batch_size": 2, "step_s": -1}],
                                    "prefill": [{"prompt_len": 1, "prefill_tokens_per_s": 1.0}]})
    with pytest.raises(ValueError, match="prefill"):
        StepTimeModel.from_profile({"decode": [{"batch_size": 1, "step_s": 0.1}]})


def test_max_batch_from_tpot_and_kv():
    m = StepTimeModel.from_points({1: 0.010, 64: 0.073}, {128: 1000.0})  # 1 ms more per extra sequence
    # TPOT 40 ms allows b with 0.010 + 0.001 (b - 1) <= 0.040 -> b = 31; KV 10,000 / 250 tokens -> 40.
    mb = max_batch_size(m, 10_000, 250.0, tpot_slo_s=0.040)
    assert (mb.batch_size, mb.limited_by, mb.kv_limit) == (31, "tpot_slo", 40)
    mb = max_batch_size(m, 5_000, 250.0, tpot_slo_s=0.040)
    assert (mb.batch_size, mb.limited_by) == (20, "kv_cache")
    assert max_batch_size(m, 10_000, 250.0, tpot_slo_s=0.005).batch_size == 0


def test_workload_round_trips_through_its_dict(tmp_path):
    synthetic = Workload(5.0, LengthDist.parse("128:512"), LengthDist.fixed(64), burstiness=0.5)
    d = synthetic.to_dict()
    assert d["input_len"] == {"kind": "uniform", "lo": 128, "hi": 512}
    assert d["output_len"] == {"kind": "fixed", "lo": 64, "hi": 64}
    assert (d["arrival_process"], d["burstiness"], d["rate_rps"]) == ("gamma", 0.5, 5.0)
    assert Workload.from_dict(json.loads(json.dumps(d))) == synthetic
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"prompt_tokens": 10, "output_tokens": 3}) + "\n"
                 + json.dumps({"prompt": "x" * 41, "max_tokens": 7}) + "\n")
    trace = Workload.from_trace(p, rate_rps=2.0)
    back = Workload.from_dict(json.loads(json.dumps(trace.to_dict())))
    assert back == trace and back.paired and back.input_len.kind == "empirical"
    assert (back.input_len.lo, back.input_len.hi) == (10, 11)
    assert back.generate(50, seed=1).prompt_tokens.tolist() == trace.generate(50, seed=1).prompt_tokens.tolist()
    assert Workload.from_dict(d) != Workload.from_dict(dict(d, rate_rps=6.0))


def test_workload_from_dict_errors_name_the_field():
    d = Workload(5.0, LengthDist.fixed(8), LengthDist.fixed(8)).to_dict()
    with pytest.raises(ValueError, match="workload.input_len.kind='normal'"):
        Workload.from_dict(dict(d, input_len={"kind": "normal", "lo": 1, "hi": 2}))
    with pytest.raises(ValueError, match="workload.output_len.lo"):
        Workload.from_dict(dict(d, output_len={"kind": "uniform", "lo": 0, "hi": 2}))
    with pytest.raises(ValueError, match="rate_rps"):
        Workload.from_dict({k: v for k, v in d.items() if k != "rate_rps"})
    with pytest.raises(ValueError, match="arrival_process"):
        Workload.from_dict(dict(d, arrival_process="hawkes"))
