"""The cost frontier: Pareto-correct points, the quality-budget choice, the variant registry, the planner's use of a
smaller KV cache, and `pernode frontier` end to end on a tiny model."""
from __future__ import annotations

import copy
import itertools
import json
import random

import pytest

from pernode.cli import main
from pernode.jobs.frontier import (VARIANTS, FrontierSettings, Variant, default_variant_names, path_variant,
                                   register_variant, round_order, variants_named)
from pernode.measure.profile.profile_median import median_profile
from pernode.price.frontier import (Frontier, FrontierPoint, cheapest_within, dominates, mark_frontier,
                                    parse_fraction, pareto_front, point_from_plan)
from pernode.price.planner import plan
from test_fleet_planner import SLO_LOOSE, WORKLOAD, toy_profile
from tiny_model import tiny_config, write_tiny_model


def pt(name: str, cost: float | None, ppl: float, base: float = 10.0) -> FrontierPoint:
    return FrontierPoint(name=name, description=name, perplexity=ppl, ppl_increase=ppl / base - 1,
                         feasible=cost is not None, cost_per_million_output_tokens_usd=cost,
                         cost_per_month_usd=None if cost is None else cost * 100)


# cost $/Mtok, perplexity: by hand, the frontier is fp32 (best quality), int8 (cheaper, a bit worse), int4 (cheapest)
CASE = [pt("fp32", 4.0, 10.0), pt("bf16", 4.0, 10.2),  # bf16: same cost, worse ppl -> dominated by fp32
        pt("int8", 2.0, 10.3), pt("w8a8", 2.5, 10.4),  # w8a8: dearer and worse than int8 -> dominated
        pt("int4", 1.0, 11.0), pt("int4-bad", 1.0, 12.5),  # same cost as int4, worse -> dominated
        pt("slow", 9.0, 9.9),  # dearest but best quality: on the frontier
        pt("infeasible", None, 9.0)]  # no fleet meets the SLO: never on the frontier, whatever its quality


def test_pareto_front_by_hand():
    assert [p.name for p in pareto_front(CASE)] == ["int4", "int8", "fp32", "slow"]
    marked = mark_frontier(CASE)
    assert [p.name for p in marked] == [p.name for p in CASE]  # order kept
    assert {p.name for p in marked if p.on_frontier} == {"int4", "int8", "fp32", "slow"}
    twins = [pt("a", 1.0, 5.0), pt("b", 1.0, 5.0)]  # identical points dominate neither
    assert [p.name for p in pareto_front(twins)] == ["a", "b"]


def test_pareto_front_property_on_random_points():
    rng = random.Random(0)
    for _ in range(50):
        pts = [pt(f"v{i}", rng.choice([None, rng.randint(1, 6)]), rng.randint(10, 15)) for i in range(8)]
        front = pareto_front(pts)
        feasible = [p for p in pts if p.feasible]
        for p in front:  # nothing beats a frontier point on both axes
            assert not any(dominates(q, p) for q in feasible)
        for p in feasible:  # everything else is beaten by a frontier point
            if p not in front:
                assert any(dominates(q, p) for q in front)
        assert all(a.cost <= b.cost and a.perplexity >= b.perplexity for a, b in itertools.pairwise(front))


def test_cheapest_within_budget_picks_the_right_point():
    assert cheapest_within(CASE, 0.05).name == "int8"  # int4 is +10%, over budget; int8 +3% is cheapest within
    assert cheapest_within(CASE, 0.10).name == "int4"
    assert cheapest_within(CASE, 0.0).name == "fp32"  # the baseline itself
    assert cheapest_within([pt("x", 1.0, 12.0), pt("y", None, 10.0)], 0.05) is None  # y meets it but no fleet does
    tie = [pt("worse", 2.0, 10.4), pt("better", 2.0, 10.1)]
    assert cheapest_within(tie, 0.05).name == "better"  # equal cost: the better perplexity
    with pytest.raises(ValueError, match="max_ppl_increase=-0.1"):
        cheapest_within(CASE, -0.1)


def test_parse_fraction():
    assert parse_fraction("5%") == pytest.approx(0.05)
    assert parse_fraction("0.05") == pytest.approx(0.05)
    assert parse_fraction(" 12.5 % ".replace(" %", "%")) == pytest.approx(0.125)
    for bad in ("five", "-1%", "nan"):
        with pytest.raises(ValueError, match="max_ppl_increase="):
            parse_fraction(bad)


def test_frontier_round_trips_and_names_its_baseline():
    f = Frontier.build("fp32", CASE, "w", "s", "p", ["a note"])
    back = Frontier.from_dict(json.loads(json.dumps(f.to_dict())))
    assert back == f
    assert [p.name for p in f.frontier] == ["int4", "int8", "fp32", "slow"]
    with pytest.raises(ValueError, match="baseline='nope'"):
        Frontier.build("nope", CASE, "w", "s", "p")


def test_smaller_kv_cache_raises_the_kv_limited_batch_and_cuts_the_bill():
    """The planner reads the profile's KV capacity: an int8 cache (3.76x the tokens in the same bytes) lifts a
    KV-bound batch, so fewer replicas serve the same load."""
    float_kv = toy_profile()
    int8_kv = copy.deepcopy(float_kv)
    ratio = 256 / 68  # fp32 (64 values x 4 B) vs int8 (64 x 1 B + a 4 B scale) per head per token
    int8_kv["kv_cache"]["max_tokens"] = int(float_kv["kv_cache"]["max_tokens"] * ratio)
    p_float, p_int8 = plan(float_kv, WORKLOAD, SLO_LOOSE, 2.0), plan(int8_kv, WORKLOAD, SLO_LOOSE, 2.0)
    # the engine's KV rule (blocks over the blocks a request holds on average over its life) gives 20 and 76 here
    assert (p_float.max_batch.batch_size, p_float.max_batch.limited_by) == (20, "kv_cache")
    assert p_int8.max_batch.batch_size == 76 and p_int8.replicas < p_float.replicas
    a = point_from_plan("fp32", "", 10.0, 10.0, p_float, 92160)
    b = point_from_plan("int8-kv", "", 10.02, 10.0, p_int8, 24480)
    assert b.ppl_increase == pytest.approx(0.002) and b.cost < a.cost
    assert [p.name for p in pareto_front([a, b])] == ["int8-kv", "fp32"]


def test_variant_registry_validates():
    assert {"fp32", "bf16", "int8-kv", "rtn-int4", "gptq-int4", "awq-int4", "rtn-int8", "w8a8"} <= set(VARIANTS)
    with pytest.raises(ValueError, match="already registered"):
        register_variant(Variant("fp32", "again"))
    with pytest.raises(ValueError, match="recipe='nope' is unknown"):
        Variant("x", "x", recipe="nope")
    with pytest.raises(ValueError, match=r"engine settings \['model'\] are not allowed"):
        Variant("x", "x", engine={"model": "other"})
    with pytest.raises(ValueError, match="variants=nope: unknown; allowed fp32"):
        variants_named(["fp32", "nope"])
    with pytest.raises(ValueError, match="ppl_windows=0 is out of range"):
        FrontierSettings(ppl_windows=0)


def test_frontier_command_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model = write_tiny_model(str(tmp_path / "tiny"), tiny_config(head_dim=32, hidden_size=128))
    out, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    student = write_tiny_model(str(tmp_path / "student"), tiny_config(head_dim=32, hidden_size=128), seed=1)
    rc = main(["frontier", "--model", model, "--variants", "fp32", "--quick", "--kv-cache-bytes", "4MiB",
               "--variant", f"distilled={student}", "--rounds", "2",
               "--rate", "1", "--input-len", "32:64", "--output-len", "16:32", "--slo", "tpot_ms=2000",
               "--max-ppl-increase", "5%", "--out", str(out), "--plot", str(png),
               "--checkpoints", str(tmp_path / "ck")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cheapest within 5% perplexity:" in text and "cost frontier" in text
    f = Frontier.from_dict(json.loads(out.read_text()))
    by = {p.name: p for p in f.points}
    assert set(by) == {"fp32", "distilled"} and f.baseline == "fp32" and by["fp32"].ppl_increase == 0
    # the student (other random weights) is scored by the same protocol: its own perplexity, not the teacher's
    assert abs(by["distilled"].ppl_increase) > 0.01
    # two interleaved rounds, rotating order, the load recorded per round and per variant
    assert [r["order"] for r in f.rounds] == [["fp32", "distilled"], ["distilled", "fp32"]]
    assert all(len(r["load_avg_1m"]) == 2 and set(r["variants"]) == set(by) for r in f.rounds)
    assert all(v["engine_load_s"] > 0 for r in f.rounds for v in r["variants"].values())
    assert any("2 interleaved round(s)" in n and "reloaded each engine" in n for n in f.notes)
    assert [p.name for p in f.points if p.on_frontier] == [p.name for p in pareto_front(f.points)]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_frontier_command_names_bad_flags(capsys, caplog):
    assert main(["frontier", "--max-ppl-increase", "lots"]) == 2
    assert "--max-ppl-increase 'lots'" in caplog.text + capsys.readouterr().err


def test_pruned_and_distilled_variants_are_registered():
    for name, recipe in (("sparsegpt-50", "sparsegpt-50"), ("sparsegpt-2:4", "sparsegpt-2:4"),
                         ("sparsegpt-50+gptq-int4", "sparsegpt-50+gptq-int4-g64")):
        assert VARIANTS[name].recipe == recipe
    assert VARIANTS["sparsegpt-50"].engine["dtype"] == "float32"  # the bitmask GEMV reads fp32 weights
    assert VARIANTS["structured-ffn1024"].make_checkpoint is not None
    names = default_variant_names()
    assert "distilled" not in names and {"sparsegpt-50", "structured-ffn1024", "fp32"} <= set(names)


def test_a_distilled_variant_names_where_its_checkpoint_must_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="pernode distill --out CHECKPOINTS/distilled"):
        VARIANTS["distilled"].make_checkpoint("base", str(tmp_path))
    (tmp_path / "distilled").mkdir()
    (tmp_path / "distilled" / "config.json").write_text("{}")
    assert VARIANTS["distilled"].make_checkpoint("base", str(tmp_path)) == str(tmp_path / "distilled")
    v = path_variant(f"distilled={tmp_path / 'distilled'}")
    assert v.name == "distilled" and v.engine["dtype"] == "float32" and str(tmp_path) in v.description
    for bad, match in (("distilled", "write NAME=PATH"), ("=x", "write NAME=PATH"),
                       ("gptq-int4=x", "registered variant made from the base model")):
        with pytest.raises(ValueError, match=match):
            path_variant(bad)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        path_variant(f"student={tmp_path / 'nowhere'}").make_checkpoint("base", str(tmp_path))


def test_pareto_marking_with_pruned_and_distilled_points():
    # by hand: sparsegpt-50 is cheaper than fp32 but worse; 2:4 costs as much as sparsegpt-50 and is worse
    # (dominated); sparsegpt-50+int4 is the cheapest; distilled is dearer than sparsegpt-50 and worse (dominated);
    # structured is cheaper than sparsegpt-50 and better than the int4 point: on the frontier between them
    case = [pt("fp32", 4.0, 10.0), pt("sparsegpt-50", 2.0, 14.9), pt("sparsegpt-2:4", 2.0, 22.6),
            pt("sparsegpt-50+gptq-int4", 0.8, 16.8), pt("distilled", 2.5, 15.5), pt("structured-ffn1024", 1.5, 15.6)]
    assert [p.name for p in pareto_front(case)] == ["sparsegpt-50+gptq-int4", "structured-ffn1024", "sparsegpt-50",
                                                    "fp32"]
    assert cheapest_within(case, 0.49).name == "sparsegpt-50"  # structured is +56%: over this budget
    assert cheapest_within(case, 0.60).name == "structured-ffn1024"
    assert cheapest_within(case, 0.70).name == "sparsegpt-50+gptq-int4"


def _profile_slowed(factor: float) -> dict:
    """The synthetic SmolLM2 profile with every time `factor` x longer and its rates as a run would report them."""
    from test_measure_profile import synthetic_profile

    prof = synthetic_profile()
    for p in prof["decode"]:
        p["step_s"] *= factor
        for k in ("output_tokens_per_s", "achieved_gbs", "achieved_flops", "fraction_of_peak"):
            p[k] /= factor
    for p in prof["prefill"]:
        p["ttft_s"] *= factor
        for k in ("prefill_tokens_per_s", "achieved_gbs", "achieved_flops", "fraction_of_peak"):
            p[k] /= factor
    return prof


def test_median_profile_takes_each_points_median_and_rescales_its_rates():
    runs = [_profile_slowed(1.0), _profile_slowed(4.0), _profile_slowed(1.2)]  # the second round ran loaded
    m, mid = median_profile(runs), runs[2]
    for got, want in zip(m["decode"] + m["prefill"], mid["decode"] + mid["prefill"]):
        numbers = {k: v for k, v in got.items() if not k.endswith("_rounds")}
        assert numbers == pytest.approx({**want, "rounds": 3})
    assert m["decode"][0]["step_s_rounds"] == [r["decode"][0]["step_s"] for r in runs]
    assert m["prefill"][1]["ttft_s_rounds"] == [r["prefill"][1]["ttft_s"] for r in runs]
    assert runs[0]["decode"][0]["step_s"] < m["decode"][0]["step_s"]  # inputs untouched
    assert median_profile(runs[:1]) is runs[0]
    other = _profile_slowed(1.0)
    other["kv_cache"] = {**other["kv_cache"], "max_tokens": 16}
    with pytest.raises(ValueError, match="different engines"):
        median_profile([runs[0], other])


def test_rounds_rotate_the_order():
    names = ["a", "b", "c"]
    assert [round_order(names, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                        ["a", "b", "c"]]
    with pytest.raises(ValueError, match="rounds=0 is out of range"):
        FrontierSettings(rounds=0)


def test_pruned_variant_checkpoints_are_made_once_and_served(tmp_path):
    """The structured-pruned maker and a SparseGPT recipe write checkpoints the engine serves, reused on a rerun."""
    from pernode.jobs.frontier import CheckpointMaker
    from pernode.jobs.frontier_variants import structured_pruned
    from pernode.serve.engine.llm_engine import LLMEngine
    from pernode.config import EngineConfig

    model = write_tiny_model(str(tmp_path / "tiny"))
    make = structured_pruned("ffn=64", calib_windows=2, refit_windows=0)
    path = make(model, str(tmp_path / "ck"))
    assert path == str(tmp_path / "ck" / "structured-ffn64")
    assert json.loads((tmp_path / "ck" / "structured-ffn64" / "config.json").read_text())["intermediate_size"] == 64
    assert make(model, str(tmp_path / "ck")) == path  # reused
    sparse = CheckpointMaker(model, str(tmp_path / "ck"), calib_windows=2)(
        Variant("s50", "s", recipe="sparsegpt-50", engine={"dtype": "float32"}))
    for ckpt in (path, sparse):
        engine = LLMEngine(EngineConfig(model=ckpt, device="cpu", num_blocks=16, max_model_len=256, dtype="float32"))
        assert engine.model_config.num_hidden_layers == 2
        del engine
