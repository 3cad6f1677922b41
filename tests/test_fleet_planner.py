"""The planner: a case worked by hand, the search, prices, projections, comparison, rendering and the CLI."""
from __future__ import annotations

import argparse
import copy
import json

import pytest

from pernode.cli.plan import add_arguments, run_plan
from pernode.price.planner import Plan, compare_plans, plan
from pernode.price.pricing import PRICES, resolve_price
from pernode.price.report import plot_plan, render_comparison, render_plan
from pernode.slo import SLO
from pernode.price.workload import LengthDist, Workload


def toy_profile(step_s: float = 0.05, **overrides) -> dict:
    """A node whose decode step is a flat `step_s` at every batch and whose prefill runs at 10,000 tokens/s."""
    prof = {
        "schema_version": 1, "kind": "measured", "projected_from": None, "created_at": "2026-11-28T20:00:00Z",
        "pernode_version": "0.1.0",
        "model": {"name": "toy-135m", "dtype": "float32", "kv_bytes_per_token": 92160, "max_model_len": 2048},
        "hardware": {"name": "toy accelerator", "device": "cpu"},
        "kv_cache": {"kv_cache_bytes": 294912000, "block_size": 16, "num_blocks": 200, "max_tokens": 3200,
                     "context_len": 2048, "max_concurrent_seqs": 1},
        "decode": [{"batch_size": b, "context_len": 512, "step_s": step_s, "output_tokens_per_s": b / step_s}
                   for b in (1, 8, 16, 32)],
        "prefill": [{"prompt_len": n, "ttft_s": n / 10_000, "prefill_tokens_per_s": 10_000.0} for n in (64, 512)],
        "serve_runs": [],
    }
    prof.update(overrides)
    return prof


WORKLOAD = Workload(10.0, LengthDist.fixed(100), LengthDist.fixed(100))
SLO_LOOSE = SLO(ttft_s=2.0, tpot_s=0.1)
QUICK = dict(num_requests=1000, interval_seeds=1)  # enough for these cases; the engine-driven simulator steps


def test_plan_worked_by_hand():
    # Worked by hand:
    #   max batch, the engine's KV rule: a request of 100 + 100 tokens holds ceil((100 + j) / 16) blocks of 16 in
    #   its step j = 0..99, 9.82 blocks on average; 200 blocks // 9.82 = 20. Every batch meets TPOT (50 ms <= 100 ms)
    #   -> 20, KV-bound.
    #   a request holds a slot 100 steps * 0.05 s + 20 prompts * 100 tokens / 10,000 tok/s = 5.2 s
    #   capacity = 20 / 5.2 = 3.846 req/s per replica
    #   utilisation < 1 needs N > 10 / 3.846 = 2.6 -> N >= 3 (2 replicas would run at 130%, an unbounded queue)
    #   at N = 3, utilisation = 10 / (3 * 3.846) = 0.8667; the simulator confirms the 2 s TTFT SLO holds.
    #   cost: 3 x $2 = $6/h; x 730 h = $4,380/month;
    #   output tokens: 10 req/s x 100 x 3600 = 3.6M/h -> $6 / 3.6 = $1.6667 per million output tokens.
    p = plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, num_requests=1000, interval_seeds=3)
    assert p.feasible and p.replicas == 3
    assert (p.max_batch.batch_size, p.max_batch.limited_by) == (20, "kv_cache")
    assert p.request_service_s == pytest.approx(5.2)
    assert p.capacity_rps_per_replica == pytest.approx(20 / 5.2)
    assert p.min_replicas_for_utilisation == 3
    assert p.utilisation == pytest.approx(10 / (3 * 20 / 5.2))
    assert p.cost_per_hour_usd == pytest.approx(6.0)
    assert p.cost_per_month_usd == pytest.approx(4380.0)
    assert p.cost_per_million_output_tokens_usd == pytest.approx(6.0 / 3.6)
    assert p.attainment >= 0.99
    # The curve shows the neighbours: 2 replicas fail badly, more replicas cost more and still meet the SLO.
    by_n = {pt.replicas: pt for pt in p.curve}
    assert by_n[2].attainment < 0.5 and by_n[4].meets_target
    assert by_n[4].cost_per_hour_usd == pytest.approx(8.0)
    # The chosen fleet on three seeds: each figure as a range that holds the seed-0 value.
    assert p.intervals["seeds"] == [0, 1, 2]
    for key, (metric, q) in {"ttft_p50_ms": ("ttft", "p50"), "tpot_p99_ms": ("tpot", "p99")}.items():
        lo, hi = p.intervals[key]
        assert lo <= p.latency_s[metric][q] * 1000 <= hi and lo < hi
    # What the plan rests on is stated, and the serving path is said to be left out of this profile.
    assert any("decode[] step times at batch 1, 8, 16, 32" in line for line in p.rests_on)
    assert any("serving_path: not measured" in line for line in p.rests_on) and not p.assumptions


def test_headroom_raises_the_floor():
    # headroom 0.25: N > 10 / (3.846 * 0.75) = 3.47 -> 4 replicas, $8/h.
    p = plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, headroom=0.25, **QUICK)
    assert p.replicas == 4 and p.cost_per_hour_usd == pytest.approx(8.0)
    assert p.utilisation < 0.75


def test_simulation_corrects_the_queueing_guess_downward():
    # With a 500 ms TTFT SLO the M/M/c estimate (exponential service) wants 4; the simulated fleet,
    # whose service times are fixed, already meets it with 3.
    p = plan(toy_profile(), WORKLOAD, SLO(ttft_s=0.5, tpot_s=0.1), 2.0, **QUICK)
    assert p.queueing["first_guess_replicas"] == 4
    assert p.replicas == 3


def test_unreachable_slos_are_reported_not_raised():
    p = plan(toy_profile(), WORKLOAD, SLO(tpot_s=0.04), 2.0)  # a lone decode step takes 50 ms
    assert not p.feasible and "tpot" in p.reason and p.replicas is None
    p = plan(toy_profile(), WORKLOAD, SLO(ttft_s=0.005), 2.0, max_replicas=8, **QUICK)  # prefill alone: 10 ms
    assert not p.feasible and "max_replicas = 8" in p.reason
    json.dumps(p.to_dict(), allow_nan=False)


def test_projected_profile_is_labelled():
    prof = toy_profile(kind="projected", projected_from="cpu (2 cores)", hardware={"name": "H200"})
    p = plan(prof, WORKLOAD, SLO_LOOSE, 2.0, **QUICK)
    assert "projected from cpu (2 cores) to H200" in p.profile_label
    assert p.to_dict()["profile"]["projected_from"] == "cpu (2 cores)"
    assert any("projected" in n for n in p.notes)


def test_prices_table_and_user_figure_wins():
    assert resolve_price(instance="aws-p5.48xlarge").per_node_hour_usd == pytest.approx(98.32 / 8)
    assert resolve_price(3.5, instance="aws-p5.48xlarge").per_node_hour_usd == 3.5
    for entry in PRICES.values():
        assert entry.source and entry.as_of and entry.per_node_hour_usd > 0
    p = plan(toy_profile(), WORKLOAD, SLO_LOOSE, instance="gcp-g2-standard-4", **QUICK)
    assert p.cost_per_hour_usd == pytest.approx(3 * PRICES["gcp-g2-standard-4"].per_node_hour_usd)


def test_compare_plans_ranks_cheapest_first(capsys):
    # fast: 25 ms steps -> slot 2.7 s, capacity 7.4 req/s, N >= 2 -> 2 x $3 = $6/h; slow: 3 x $2.5 = $7.5/h.
    profiles = {"slow": toy_profile(0.05), "fast": toy_profile(0.025), "hopeless": toy_profile(0.2)}
    comp = compare_plans(profiles, WORKLOAD, SLO_LOOSE, {"slow": 2.5, "fast": 3.0, "hopeless": 1.0}, **QUICK)
    ranked = [label for label, _ in comp.ranked()]
    assert ranked == ["fast", "slow", "hopeless"]
    assert comp.plans["fast"].replicas == 2 and comp.plans["fast"].cost_per_hour_usd == pytest.approx(6.0)
    assert not comp.plans["hopeless"].feasible  # 200 ms steps miss the 100 ms TPOT at any batch
    json.dumps(comp.to_dict(), allow_nan=False)
    render_comparison(comp)
    assert "fast" in capsys.readouterr().out
    with pytest.raises(ValueError, match="hopeless"):
        compare_plans(profiles, WORKLOAD, SLO_LOOSE, {"slow": 2.0, "fast": 3.0}, **QUICK)


def test_render_and_plot(tmp_path, capsys):
    p = plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, num_requests=1000, interval_seeds=2)
    render_plan(p)
    assert "replicas" in capsys.readouterr().out
    png = tmp_path / "plan.png"
    plot_plan(p, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_planner_inputs():
    with pytest.raises(ValueError, match="attainment_target"):
        plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, attainment_target=1.5)
    with pytest.raises(ValueError, match="headroom"):
        plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, headroom=1.0)
    with pytest.raises(ValueError, match="policy"):
        plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, policy="random")
    with pytest.raises(ValueError, match="price"):
        plan(toy_profile(), WORKLOAD, SLO_LOOSE, -1.0)
    with pytest.raises(ValueError, match="max_model_len"):
        plan(toy_profile(), Workload(1.0, LengthDist.fixed(2000), LengthDist.fixed(100)), SLO_LOOSE, 2.0)
    with pytest.raises(ValueError, match="kv_cache.max_tokens"):
        plan(toy_profile(model={"name": "long", "max_model_len": 8192}),
             Workload(1.0, LengthDist.fixed(2000), LengthDist.fixed(2000)), SLO_LOOSE, 2.0)
    broken = copy.deepcopy(toy_profile())
    del broken["kv_cache"]["max_tokens"]
    with pytest.raises(ValueError, match="kv_cache.max_tokens"):
        plan(broken, WORKLOAD, SLO_LOOSE, 2.0)
    with pytest.raises(ValueError, match="tpot_ms"):
        SLO.parse("tpot_ms=-3")
    with pytest.raises(ValueError, match="KEY=MILLISECONDS"):
        SLO.parse("ttft=5")


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_plan(parser.parse_args(argv))


def test_cli_end_to_end(tmp_path, capsys):
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(toy_profile()))
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = _cli(["--profile", str(prof), "--rate", "10", "--input-len", "100", "--output-len", "100",
               "--slo", "ttft_ms=2000,tpot_ms=100", "--price-per-hour", "2", "--out", str(out), "--plot", str(png),
               "--num-requests", "1000", "--interval-seeds", "2"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["replicas"] == 3 and data["cost_per_month_usd"] == pytest.approx(4380.0)
    assert data["intervals"]["seeds"] == [0, 1] and len(data["rests_on"]) >= 4
    assert data["slo_ms"] == {"ttft_ms": 2000.0, "tpot_ms": 100.0, "e2e_ms": None}
    assert png.stat().st_size > 0
    loaded = Plan.load(out)  # what `pernode fleet` reads back
    assert loaded.replicas == 3 and loaded.max_batch.batch_size == 20 and loaded.workload.rate_rps == 10.0
    assert loaded.intervals == data["intervals"]
    # A fleet of a given size is evaluated, not searched for: 4 replicas meet the SLO at a higher bill.
    rc = _cli(["--profile", str(prof), "--rate", "10", "--input-len", "100", "--output-len", "100",
               "--slo", "ttft_ms=2000,tpot_ms=100", "--price-per-hour", "2", "--out", str(out),
               "--num-requests", "1000", "--interval-seeds", "1", "--replicas", "4"])
    assert rc == 0 and json.loads(out.read_text())["replicas"] == 4
    assert _cli(["--profile", str(prof), "--rate", "10", "--input-len", "100", "--output-len", "100",
                 "--slo", "tpot_ms=40", "--price-per-hour", "2", "--num-requests", "1000"]) == 1


@pytest.mark.parametrize("bad, field", [
    (["--rate", "-1"], "--rate"),
    (["--attainment", "1.5"], "--attainment"),
    (["--headroom", "1"], "--headroom"),
    (["--input-len", "x:y"], "--input-len"),
    (["--slo", "ttft=5"], "KEY=MILLISECONDS"),
    (["--burstiness", "0"], "--burstiness"),
    (["--max-replicas", "0"], "--max-replicas 0"),  # library rules, shown with the flag that set them
    (["--price-per-hour", "-1"], "--price-per-hour -1.0"),
    (["--num-requests", "5"], "--num-requests 5"),
])
def test_cli_bad_inputs_name_the_field(tmp_path, capsys, bad, field):
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(toy_profile()))
    args = {"--profile": str(prof), "--rate": "10", "--input-len": "100", "--output-len": "100",
            "--slo": "ttft_ms=2000", "--price-per-hour": "2"}
    args.update(dict(zip(bad[::2], bad[1::2])))
    assert _cli([x for kv in args.items() for x in kv]) == 2
    assert field in " ".join(capsys.readouterr().err.split())


def test_cli_needs_a_price_and_a_readable_profile(tmp_path, capsys):
    base = ["--rate", "10", "--input-len", "100", "--output-len", "100", "--slo", "ttft_ms=2000"]
    assert _cli(["--profile", str(tmp_path / "missing.json"), "--price-per-hour", "2"] + base) == 2
    assert "--profile" in capsys.readouterr().err
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(toy_profile()))
    assert _cli(["--profile", str(prof)] + base) == 2
    assert "--price-per-hour" in " ".join(capsys.readouterr().err.split())


def test_plan_round_trips_through_json(tmp_path):
    p = plan(toy_profile(), Workload(10.0, LengthDist.uniform(50, 150), LengthDist.fixed(100), burstiness=0.8),
             SLO_LOOSE, 2.0, num_requests=1000, interval_seeds=2)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    path = tmp_path / "plan.json"
    p.save(path)
    back = Plan.load(path)
    assert back == p
    # The typed surface other jobs use.
    assert (back.replicas, back.max_batch.batch_size, back.policy, back.seed) == (p.replicas, 20, p.policy, 0)
    assert back.workload.input_len.kind == "uniform" and (back.workload.input_len.lo, back.workload.input_len.hi) == \
        (50, 150)
    assert back.workload.burstiness == 0.8 and back.slo.to_dict()["ttft_ms"] == 2000.0
    assert back.latency_s["ttft"]["p99"] == p.latency_s["ttft"]["p99"] and back.simulated_requests == 1000
    # Readers and the HTML report keep their keys beside the structure.
    w = json.loads(path.read_text())["workload"]
    assert w["description"] == p.workload.describe() and w["rate_rps"] == 10.0
    assert (w["mean_input_tokens"], w["mean_output_tokens"]) == (100.0, 100.0)
    assert w["input_len"] == {"kind": "uniform", "lo": 50, "hi": 150}


def test_infeasible_plan_round_trips_and_bad_files_name_themselves(tmp_path):
    p = plan(toy_profile(), WORKLOAD, SLO(tpot_s=0.04), 2.0)
    assert Plan.from_dict(p.to_dict()) == p and not p.curve
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        Plan.load(bad)
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        Plan.load(tmp_path / "missing.json")
    d = p.to_dict()
    del d["max_batch_per_replica"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bad.json: plan: missing key 'max_batch_per_replica'"):
        Plan.load(bad)


def test_slo_round_trips_and_names_the_setting():
    slo = SLO.parse("ttft_ms=1001, tpot_ms=63.7")
    assert slo.to_dict() == {"ttft_ms": 1001.0, "tpot_ms": 63.7, "e2e_ms": None}  # as typed, not 1000.9999
    assert SLO.from_dict(slo.to_dict()) == slo
    with pytest.raises(ValueError, match="^slo='x': expected KEY=MILLISECONDS"):
        SLO.parse("x")
    with pytest.raises(ValueError, match="unknown keys"):
        SLO.from_dict({"ttft_s": 1.0})
    with pytest.raises(ValueError, match="max_replicas=0"):
        plan(toy_profile(), WORKLOAD, SLO_LOOSE, 2.0, max_replicas=0)


def test_a_projection_is_labelled_by_its_source_hardware_not_its_whole_record():
    from pernode.measure.profile.projection import project_profile
    from pernode.price.planner import profile_label
    from test_measure_profile import synthetic_profile

    measured = synthetic_profile()
    proj = project_profile(measured, "H200 SXM")
    assert isinstance(proj["projected_from"], dict)  # the projection writes a record, keyed hardware_name
    label, kind, _, hw, src = profile_label(proj)
    assert kind == "projected" and src == measured["hardware"]["name"]
    assert label == f"smollm2-135m on {hw} (projected from {measured['hardware']['name']} to {hw})"
    assert "{" not in label and "method" not in label
    p = plan(proj, WORKLOAD, SLO_LOOSE, 2.0, num_requests=200, interval_seeds=1)
    assert p.profile_label == label and p.to_dict()["profile"]["projected_from"] == measured["hardware"]["name"]
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))).profile_label == label


def test_a_dip_in_the_measured_decode_curve_is_kept_but_the_tpot_limit_takes_the_envelope():
    from pernode.price.max_batch import max_batch_size
    from pernode.price.step_time import StepTimeModel

    # as measured on an AVX-512 CPU: 4 rows step much slower than 3, 8 faster than 7
    decode = [{"batch_size": b, "context_len": 512, "step_s": s, "output_tokens_per_s": b / s}
              for b, s in ((1, 0.010), (3, 0.016), (4, 0.030), (7, 0.037), (8, 0.033), (9, 0.042))]
    model = StepTimeModel.from_profile(toy_profile(decode=decode))
    assert model.decode_step_s(8) == pytest.approx(0.033) and model.decode_step_s(7) == pytest.approx(0.037)
    assert model.decode_step_s(2) == pytest.approx(0.013)  # linear between measured neighbours
    # a 35 ms TPOT SLO: batch 8 alone would meet it, but a replica at max batch 8 also runs 7, which does not
    mb = max_batch_size(model, 10**6, 100.0, tpot_slo_s=0.035)
    assert (mb.batch_size, mb.tpot_limit) == (6, 6)
