"""The serving path measured at several concurrent streams: the line fit that splits it into a cost per step and a
cost per running stream, the profile section it writes, and how the planner's step time and simulator add it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tiny_model import write_tiny_model

from pernode.measure.profile.serving_path_fit import (StreamTiming, added_cpu_s, fit_stream_costs, per_step_curve,
                                                     summarize_streams)
from pernode.measure.profile.serving_path_streams import parse_streams
from pernode.price.plan_basis import measured_basis
from pernode.price.simulator import ReplicaConfig, simulate_fleet
from pernode.price.step_time import StepTimeModel, serving_path_s
from pernode.price.workload import RequestTrace

PROFILE = {"decode": [{"batch_size": 1, "step_s": 0.010}, {"batch_size": 8, "step_s": 0.024}],
           "prefill": [{"prompt_len": 32, "prefill_tokens_per_s": 2000.0},
                       {"prompt_len": 256, "prefill_tokens_per_s": 5000.0}],
           "kv_cache": {"max_tokens": 10_000, "block_size": 16}}


def test_fit_recovers_a_fixed_part_and_a_part_per_stream():
    c = [1, 2, 4, 8]
    fit = fit_stream_costs(c, [0.002 + 0.003 * k for k in c])  # 2 ms per step + 3 ms per stream, exactly
    assert fit.step_s == pytest.approx(0.002) and fit.token_s == pytest.approx(0.003)
    assert fit.raw_intercept_s == pytest.approx(0.002) and "line" in fit.note


def test_a_negative_intercept_is_dropped_and_the_slope_refitted_through_the_origin():
    c, d = [1, 2, 4, 8], [-0.002, 0.004, 0.010, 0.030]
    fit = fit_stream_costs(c, d)
    assert fit.raw_intercept_s < 0 and fit.step_s == 0.0
    assert fit.token_s == pytest.approx(np.dot(c, d) / np.dot(c, c))  # sum(c d) / sum(c^2)
    assert "through the origin" in fit.note


def test_a_negative_slope_is_planned_as_zero_with_the_mean_as_the_fixed_part():
    fit = fit_stream_costs([1, 2, 4], [0.006, 0.005, 0.004])
    assert fit.token_s == 0.0 and fit.step_s == pytest.approx(0.005) and fit.raw_slope_s < 0
    only_noise = fit_stream_costs([1, 2, 4], [-0.001, -0.002, -0.003])
    assert only_noise.token_s == 0.0 and only_noise.step_s == 0.0
    one_level = fit_stream_costs([4, 4], [0.008, 0.012])  # one stream count: all of it per stream
    assert one_level.token_s == pytest.approx(0.0025) and one_level.step_s == 0.0
    with pytest.raises(ValueError, match="streams"):
        fit_stream_costs([0, 1], [0.0, 0.0])
    with pytest.raises(ValueError, match="serving_path_streams"):
        parse_streams("1,x")
    assert parse_streams("1, 2,8") == (1, 2, 8)


def test_section_from_rounds_names_the_path_and_plans_the_fit():
    # HTTP adds 40 ms of TTFT at every level and 1 ms + 2 ms x streams to each token.
    by_level = {c: [(StreamTiming(0.100 + 0.01 * r, 0.020 + 0.005 * c),
                     StreamTiming(0.140 + 0.01 * r, 0.020 + 0.005 * c + 0.001 + 0.002 * c)) for r in range(6)]
                for c in (1, 2, 4, 8)}
    sp = summarize_streams(by_level, "ray", 64, 32, (0.5, 0.7), {"replica_cores": ["0"]})
    assert sp["path"] == "ray" and sp["request_s"] == pytest.approx(0.040)
    assert sp["step_s"] == pytest.approx(0.001) and sp["token_s"] == pytest.approx(0.002)
    assert [lv["streams"] for lv in sp["streams"]] == [1, 2, 4, 8] and sp["pairs"] == 24 and sp["requests"] == 90
    assert serving_path_s({"serving_path": sp}) == pytest.approx((0.040, 0.002, 0.001))
    assert serving_path_s({"serving_path": {"request_s": 0.004, "token_s": 0.0}}) == (0.004, 0.0, 0.0)  # older
    with pytest.raises(ValueError, match="serving_path.step_s"):
        serving_path_s({"serving_path": {"request_s": 0.0, "token_s": 0.0, "step_s": -1.0}})


def test_cpu_time_on_the_serving_core_sets_the_plan_when_measured():
    # Per round: the direct half ran 1.0 s of wall with the engine thread at 0.5 s and the idle server at 0.01 s;
    # the HTTP half ran 1.2 s with the server at 0.5 + 0.012 (background) + 32 steps x (1 ms + c x 2 ms).
    def rnd(c):
        extra = 32 * (0.001 + 0.002 * c)
        return (StreamTiming(0.1, 0.02, cpu_s=0.5, wall_s=1.0, server_cpu_s=0.01),
                StreamTiming(0.15, 0.03, cpu_s=0.5 + 0.012 + extra, wall_s=1.2))
    assert added_cpu_s(*rnd(2)) == pytest.approx(32 * 0.005)
    assert added_cpu_s(StreamTiming(0.1, 0.02), StreamTiming(0.1, 0.02)) is None  # no CPU readings: no estimate
    sp = summarize_streams({c: [rnd(c)] * 5 for c in (1, 2, 4)}, "serve", 64, 32, (0.0, 0.0), {})
    assert sp["fit"]["from"] == "cpu" and sp["step_s"] == pytest.approx(0.001) and sp["token_s"] == pytest.approx(0.002)
    assert sp["request_s"] == pytest.approx(0.05) and sp["wall_fit"]["token_s"] == 0.0  # the wall TPOT did not move
    assert sp["streams"][2]["added_cpu_per_step"]["median_s"] == pytest.approx(0.009)


def test_serving_threads_cpu_sets_the_plan_whatever_the_engines_cost():
    # The server's engine thread runs each step 20% cheaper than the in-process engine (0.4 s against 0.5 s per
    # round), and its serving threads spend 32 steps x (1 ms + c x 2 ms) beyond an idle background of 10 ms per
    # second. Subtracting the in-process engine from the whole process would give a negative cost; the serving
    # threads' own CPU time gives the path exactly, at every level.
    def rnd(c):
        serving = 32 * (0.001 + 0.002 * c)
        direct = StreamTiming(0.1, 0.020 + 0.004 * c, cpu_s=0.5, wall_s=1.0, server_cpu_s=0.01)
        http = StreamTiming(0.15, 0.016 + 0.0032 * c + 0.001 + 0.002 * c, cpu_s=0.012 + serving, wall_s=1.2,
                            engine_cpu_s=0.4)
        return direct, http
    assert added_cpu_s(*rnd(4)) == pytest.approx(32 * 0.009)
    whole = dataclasses.replace(rnd(4)[1], cpu_s=0.4 + 0.012 + 32 * 0.009, engine_cpu_s=None)
    assert added_cpu_s(rnd(4)[0], whole) == pytest.approx(32 * 0.009 - 0.1)  # the older estimate, biased low
    by_level = {c: [rnd(c)] * 5 for c in (1, 2, 4, 8, 16)}
    plain = summarize_streams(by_level, "serve", 64, 32, (0.0, 0.0), {})
    assert plain["engine_ratio"] == 1.0 and plain["engine_ratio_measured"]["planned"] == pytest.approx(0.8)
    assert any("0.800x" in n and n.endswith("not planned") for n in plain["notes"])
    sp = summarize_streams(by_level, "serve", 64, 32, (0.0, 0.0), {}, plan_engine_ratio=True)
    assert sp["fit"]["from"] == "cpu"
    assert sp["step_s"] == pytest.approx(0.001) and sp["token_s"] == pytest.approx(0.002)
    assert sp["wall_fit"]["raw_slope_s"] < sp["token_s"]  # the cheaper engine hides part of it in wall time
    assert [lv["server_engine_cpu_per_step_p50_s"] for lv in sp["streams"]] == [pytest.approx(0.4 / 32)] * 5
    # The server's engine ran 0.8x the in-process engine's CPU time in every round: planned, the profile's engine
    # step times scaled by it; with them the HTTP TPOT of every level is predicted exactly.
    assert sp["engine_ratio"] == pytest.approx(0.8) and sp["engine_ratio_measured"]["rounds"] == 25
    for lv in sp["streams"]:
        c = lv["streams"]
        assert lv["predicted_http_tpot_s"] == pytest.approx(lv["http_tpot_p50_s"])
        assert lv["predicted_http_tpot_s"] == pytest.approx((0.020 + 0.004 * c) * 0.8 + 0.001 + 0.002 * c)
    model = StepTimeModel.from_profile(dict(PROFILE, serving_path=sp))
    assert model.engine_decode_step_s(8) == pytest.approx(0.024 * 0.8)
    assert model.prefill_s(32) == pytest.approx(32 / 2000 * 0.8)
    assert any("x 0.800" in line for line in measured_basis(dict(PROFILE, serving_path=sp), model))
    noisy = {1: [rnd(1)[0:1] + (dataclasses.replace(rnd(1)[1], engine_cpu_s=e),) for e in (0.45, 0.5, 0.55)]}
    assert summarize_streams(noisy, "serve", 64, 32, (0.0, 0.0), {}, plan_engine_ratio=True)["engine_ratio"] == 1.0
    with pytest.raises(ValueError, match="engine_ratio"):
        StepTimeModel.from_profile(dict(PROFILE, serving_path={"request_s": 0.0, "token_s": 0.0, "engine_ratio": 3}))
    assert any("16 stream(s): HTTP TPOT" in n for n in sp["notes"])


def test_a_cost_per_stream_that_falls_with_streams_is_planned_on_the_measured_curve():
    # Through Ray the serving CPU per step grows ~1 ms per stream up to 4 streams, then flattens: 1, 2, 3.5, 4.5,
    # 5.5, 6.5 ms at 1..32 streams. A line through those misses both ends; the planned curve goes through them.
    levels = (1, 2, 4, 8, 16, 32)
    added = dict(zip(levels, (0.0010, 0.0020, 0.0035, 0.0045, 0.0055, 0.0065)))

    def rnd(c):
        return (StreamTiming(0.1, 0.02, cpu_s=0.5, wall_s=1.0, server_cpu_s=0.0),
                StreamTiming(0.1, 0.02, cpu_s=32 * added[c], wall_s=1.0, engine_cpu_s=0.5))
    sp = summarize_streams({c: [rnd(c)] * 5 for c in levels}, "ray", 64, 32, (0.0, 0.0), {})
    assert [(r["streams"], r["added_s"]) for r in sp["per_step_curve"]] == [
        (c, pytest.approx(added[c])) for c in levels]
    model = StepTimeModel.from_profile(dict(PROFILE, serving_path=sp))
    assert model.serving_decode_s(4) == pytest.approx(0.0035)
    assert model.serving_decode_s(12) == pytest.approx(0.0050)  # halfway between 8 and 16 streams
    assert model.serving_decode_s(64) == pytest.approx(0.0065 + 32 * 0.001 / 16)  # the last segment's slope on
    assert model.serving_decode_s(0) == 0.0
    line = sp["fit"]
    assert line["step_s"] + line["token_s"] > 2 * 0.0010  # the line doubles the 1-stream cost: why the curve is planned
    assert any("per decode step 1.00, 2.00, 3.50, 4.50, 5.50, 6.50 ms at 1, 2, 4, 8, 16, 32 streams" in n
               for n in measured_basis(dict(PROFILE, serving_path=sp), model))
    # A dip between levels is noise, and a negative level is nothing: the curve never falls and never goes below 0.
    assert [r["added_s"] for r in per_step_curve([4, 1, 2], [0.003, -0.001, 0.002])] == [0.0, 0.002, 0.003]
    assert [r["added_s"] for r in per_step_curve([1, 2, 4], [0.002, 0.001, 0.003])] == [0.002, 0.002, 0.003]
    with pytest.raises(ValueError, match=r"per_step_curve\[1\].added_s"):
        StepTimeModel.from_profile(dict(PROFILE, serving_path={"request_s": 0.0, "token_s": 0.0, "per_step_curve": [
            {"streams": 1, "added_s": 0.001}, {"streams": 2, "added_s": -0.001}]}))


def test_the_per_request_term_is_the_way_in_and_out_when_the_server_reports_its_first_steps():
    # The paired TTFT differences swing by 100 ms with the engine's noise; the client's TTFT less the server's own
    # first steps (first scheduled step -> first token) is 6, 7 or 8 ms every round.
    rounds = [(StreamTiming(0.100 + noise, 0.02), StreamTiming(0.150 + way, 0.02, server_first_steps_s=0.150))
              for noise, way in ((0.1, 0.006), (-0.1, 0.007), (0.0, 0.008))]
    sp = summarize_streams({1: rounds}, "ray", 64, 32, (0.0, 0.0), {})
    assert sp["request_s"] == pytest.approx(0.007) and sp["request"]["interval_s"] == pytest.approx([0.006, 0.008])
    assert sp["streams"][0]["way_in_and_out"]["median_s"] == pytest.approx(0.007)
    assert sp["streams"][0]["added_ttft"]["median_s"] == pytest.approx(0.058)  # the paired difference, kept


def test_server_cpu_is_split_into_the_engine_thread_and_the_serving_threads():
    from pernode.measure.profile.serving_path_servers import ServerCpu
    later, earlier = ServerCpu(2.5, 1.25), ServerCpu(2.0, 1.0)
    assert (later - earlier) == ServerCpu(0.5, 0.25) and later.total_s == 3.75
    assert (ServerCpu(None, 3.0) - ServerCpu(1.0, 1.0)) == ServerCpu(None, 2.0)  # no engine thread: no split


def test_step_time_and_simulator_add_the_path_per_step_and_per_stream():
    profile = dict(PROFILE, serving_path={"path": "ray", "request_s": 0.050, "token_s": 0.003, "step_s": 0.001,
                                          "streams": [{"streams": 1}, {"streams": 8}]})
    model = StepTimeModel.from_profile(profile)
    assert model.serving_path == "ray"
    assert model.engine_decode_step_s(4) == pytest.approx(0.016)  # 0.010 + 3/7 x 0.014
    assert model.decode_step_s(4) == pytest.approx(0.016 + 0.001 + 4 * 0.003)
    assert model.decode_step_s(0) == 0.0
    # a mixed step: 2 decodes and a 64-token chunk pays the engine's sum plus the path's 2 streams
    rate = 2000 + (64 - 32) / (256 - 32) * 3000
    assert model.step_s(2, 64, 64) == pytest.approx(0.012 + 64 / rate + 0.001 + 2 * 0.003)
    assert model.step_s(0, 64, 64) == pytest.approx(64 / rate)  # nothing streams in a prefill-only step
    # One request alone: it reaches the engine 50 ms late, and each of its 9 later tokens takes 10 + 1 + 3 ms.
    trace = RequestTrace(np.array([1.0]), np.array([100]), np.array([10]))
    res = simulate_fleet(trace, ReplicaConfig(model, 4, 10_000, 512), 1)
    rate100 = 2000 + (100 - 32) / (256 - 32) * 3000
    assert res.ttft_s[0] == pytest.approx(0.050 + 100 / rate100, rel=1e-9)
    assert res.tpot_s[0] == pytest.approx(0.014, rel=1e-9)
    assert any("path ray:" in line and "Ray Serve" in line and "1, 8 concurrent streams" in line
               and "+ 1.00 ms per decode step" in line
               for line in measured_basis(profile, model))
    plain = StepTimeModel.from_profile(dict(PROFILE, serving_path={"request_s": 0.004, "token_s": 0.0}))
    assert plain.serving_path == "serve" and plain.decode_step_s(4) == pytest.approx(0.016)
    assert any("(path serve: " in line for line in measured_basis(PROFILE | {"serving_path": {
        "request_s": 0.004, "token_s": 0.0}}, plain))
    assert StepTimeModel.from_profile(PROFILE).serving_path is None


def test_a_step_that_starts_on_an_idle_replica_pays_the_measured_idle_start():
    # One-stream rounds: direct TTFT 130, 140, 150 ms for 64-token prompts; the profile's warm prefill of 64
    # tokens, interpolated between 32 (80 ms) and 128 (200 ms), is 120 ms: the idle start is the median, 20 ms.
    by_level = {1: [(StreamTiming(t, 0.02), StreamTiming(t + 0.004, 0.02)) for t in (0.130, 0.140, 0.150)]}
    warm = [{"prompt_len": 32, "ttft_s": 0.080}, {"prompt_len": 128, "ttft_s": 0.200}]
    sp = summarize_streams(by_level, "serve", 64, 32, (0.0, 0.0), {}, warm)
    assert sp["idle_start"]["warm_prefill_s"] == pytest.approx(0.120)
    assert sp["idle_start_s"] == pytest.approx(0.020) and sp["request_s"] == pytest.approx(0.004)
    assert summarize_streams(by_level, "serve", 64, 32, (0.0, 0.0), {})["idle_start_s"] == 0.0  # no sweep here
    model = StepTimeModel.from_profile(dict(PROFILE, serving_path={"request_s": 0.004, "token_s": 0.0,
                                                                   "idle_start_s": 0.020}))
    rate100 = 2000 + (100 - 32) / (256 - 32) * 3000
    # Two requests: the first meets an idle replica (+20 ms), the second arrives while it is busy (no extra).
    trace = RequestTrace(np.array([1.0, 1.05]), np.array([100, 100]), np.array([10, 10]))
    res = simulate_fleet(trace, ReplicaConfig(model, 4, 10_000, 512), 1)
    assert res.ttft_s[0] == pytest.approx(0.004 + 0.020 + 100 / rate100, rel=1e-9)
    first_done = 1.0 + 0.004 + 0.020 + 100 / rate100
    assert res.ttft_s[1] == pytest.approx(first_done + 100 / rate100 + 0.010 - 1.05, rel=1e-9)  # 1 decode rides along
    assert any("idle replica" in line for line in measured_basis(
        dict(PROFILE, serving_path={"request_s": 0.004, "token_s": 0.0, "idle_start_s": 0.020}), model))
    with pytest.raises(ValueError, match="idle_start_s"):
        StepTimeModel.from_profile(dict(PROFILE, serving_path={"request_s": 0.0, "token_s": 0.0, "idle_start_s": -1}))


def test_streams_measured_against_a_real_pernode_serve(tmp_path):
    from pernode.config import EngineConfig
    from pernode.jobs.validate.ttft_parts import scrape_server_timing
    from pernode.measure.profile.serving_path_servers import pernode_serve, process_cpu_s, server_cpu_s
    from pernode.measure.profile.serving_path_streams import measure_streams
    from pernode.serve.engine.llm_engine import LLMEngine

    model = write_tiny_model(str(tmp_path / "tiny"))
    flags = ["--model", model, "--device", "cpu", "--num-threads", "1", "--num-blocks", "64", "--max-model-len", "512"]
    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_threads=1, num_blocks=64, max_model_len=512))
    with pernode_serve(flags) as path:
        assert path.server_pids and process_cpu_s(path.server_pids) > 0  # the server's threads have run
        sp = measure_streams(engine, path.url, "serve", (1, 2), rounds=2, input_len=16, output_len=4,
                             client_cores=path.client_cores, layout=path.layout,
                             server_cpu=lambda: server_cpu_s(path.server_pids),
                             warm_prefill=[{"prompt_len": 16, "ttft_s": 0.001}])
        timing = scrape_server_timing(path.url)  # what `fleet validate` reads around its run
        assert timing is not None and timing["ttft_count"] >= 6 and timing["queue_sum"] > 0
        split = server_cpu_s(path.server_pids)
        assert split.engine_s is not None and split.engine_s > 0 and split.serving_s > 0  # the named engine thread
    assert sp["path"] == "serve" and [lv["streams"] for lv in sp["streams"]] == [1, 2] and sp["pairs"] == 4
    assert all("added_cpu_per_step" in lv and "server_engine_cpu_per_step_p50_s" in lv and len(lv["timings"]) == 2
               for lv in sp["streams"])
    assert sp["fit"]["from"] == "cpu" and sp["token_s"] >= 0 and sp["step_s"] >= 0 and sp["request_s"] >= 0
    assert sp["streams"][0]["way_in_and_out"]["pairs"] == 2  # the server's /metrics read around each HTTP half
    assert all(h["server_first_steps_s"] > 0 for _, h in sp["streams"][0]["timings"])
    assert sp["idle_start"]["warm_prefill_s"] == 0.001 and sp["idle_start_s"] >= 0
    assert serving_path_s({"serving_path": sp}) == (sp["request_s"], sp["token_s"], sp["step_s"])


def test_a_request_arriving_mid_step_waits_for_the_step_boundary_as_in_the_engine():
    # A decodes alone at 10 ms a step from its first token on. B arrives 3 ms into one of those steps: the engine
    # takes new requests only between steps, so B waits the 7 ms left, then rides a mixed step with A's decode.
    model = StepTimeModel.from_profile(PROFILE)
    rate100 = 2000 + (100 - 32) / (256 - 32) * 3000
    a_first = 1.0 + 100 / rate100
    trace = RequestTrace(np.array([1.0, a_first + 0.020 + 0.003]), np.array([100, 100]), np.array([50, 10]))
    res = simulate_fleet(trace, ReplicaConfig(model, 4, 10_000, 512), 1)
    assert res.ttft_s[0] == pytest.approx(100 / rate100)
    assert res.admit_s[1] == pytest.approx(a_first + 0.030)  # the end of the step it arrived in
    assert res.ttft_s[1] == pytest.approx(0.007 + 0.010 + 100 / rate100)  # the wait, then decode + its prefill
