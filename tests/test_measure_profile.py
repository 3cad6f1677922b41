"""Profile schema: round trip, validation that names the bad field, and projection onto a published accelerator."""
import copy
import json
import math
import subprocess
import sys

import pytest

from pernode.config import ModelConfig
from pernode.measure.profile.accelerators import PUBLISHED_ACCELERATORS, get_accelerator
from pernode.measure.profile.profile_schema import (decode_point, kv_cache_section, load_profile, make_profile,
                                                   model_section, prefill_point, save_profile, validate_profile)
from pernode.measure.profile.projection import project_profile
from pernode.measure.profile.roofline import crossover_batch_size, decode_step_cost, prefill_cost, roofline_time_s

CPU = {"name": "test cpu", "device": "cpu", "memory_bytes": 24 * 2**30, "peak_bandwidth_gbs": 20.0,
       "peak_flops": {"fp32": 1.5e11, "bf16": None, "int8": 6.0e11}, "peak_source": "measured"}


def smollm():
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       name="smollm2-135m")


def synthetic_profile():
    """fp32 SmolLM2-135M on a 20 GB/s, 150 GFLOP/s CPU, every point at 80% of its roofline time."""
    cfg, ctx = smollm(), 512
    decode = []
    for b in (1, 2, 4, 8, 16):
        cost = decode_step_cost(cfg, [ctx] * b, 4, 4)
        step_s = roofline_time_s(cost.flops, cost.bytes, 20.0, 1.5e11) / 0.8
        decode.append(decode_point(b, ctx, step_s, cost, CPU, "float32"))
    prefill = []
    for p in (128, 512):
        cost = prefill_cost(cfg, p, 4, 4)
        prefill.append(prefill_point(p, roofline_time_s(cost.flops, cost.bytes, 20.0, 1.5e11) / 0.8, cost, CPU,
                                     "float32"))
    model = model_section(cfg, "float32")
    return make_profile(model, copy.deepcopy(CPU), kv_cache_section(2**30, 16, model["kv_bytes_per_token"], 2048),
                        decode, prefill, crossover_batch_size=crossover_batch_size(cfg, ctx, 20.0, 1.5e11, 4, 4),
                        memory_high_water_bytes=1_500_000_000)


def test_constructors_fill_the_contract():
    d = synthetic_profile()
    assert d["schema_version"] == 1 and d["kind"] == "measured" and d["projected_from"] is None
    assert d["model"]["num_params"] == 134_515_008 and d["model"]["weight_bytes"] == 134_515_008 * 4
    assert d["model"]["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # 46080 at fp32
    kv = d["kv_cache"]
    assert kv["num_blocks"] == 2**30 // (16 * 46080) and kv["max_tokens"] == kv["num_blocks"] * 16
    assert kv["max_concurrent_seqs"] == kv["num_blocks"] // (2048 // 16)
    p = d["decode"][0]
    assert p["bound"] == "memory" and p["fraction_of_peak"] == pytest.approx(0.8)
    assert p["output_tokens_per_s"] == pytest.approx(1 / p["step_s"])
    assert p["achieved_gbs"] == pytest.approx(p["bytes_per_step"] / p["step_s"] / 1e9)
    assert d["prefill"][1]["bound"] == "compute"  # 512-token prefill: ~500 FLOP/B against a 7.5 ridge


def test_round_trip(tmp_path):
    d = synthetic_profile()
    path = save_profile(tmp_path / "sub" / "profile.json", d)
    assert load_profile(path) == d
    assert json.loads(path.read_text())["decode"][2]["batch_size"] == 4
    # A projection (with its provenance) and a profile holding a bench serve run come back equal too.
    proj = project_profile(d, "H100 SXM")
    assert load_profile(save_profile(tmp_path / "proj.json", proj)) == proj
    from test_measure_bench_result import a_result

    with_runs = {**d, "serve_runs": [a_result(request_rate=2.0).to_dict()]}
    assert load_profile(save_profile(tmp_path / "runs.json", with_runs)) == with_runs


def test_load_names_an_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="missing.json: cannot read it"):
        load_profile(tmp_path / "missing.json")


def test_what_the_planner_reads_needs_no_torch():
    code = ("import sys; import pernode.measure.profile.profile_schema, pernode.measure.profile.projection; "
            "print('torch' in sys.modules or 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["decode"][2].pop("step_s"), "profile.decode[2].step_s"),
    (lambda d: d["decode"][0].update(step_s=-1.0), "profile.decode[0].step_s"),
    (lambda d: d["prefill"][1].update(bound="disk"), "profile.prefill[1].bound"),
    (lambda d: d["kv_cache"].update(block_size=0), "profile.kv_cache.block_size"),
    (lambda d: d["model"].update(num_layers="30"), "profile.model.num_layers"),
    (lambda d: d["hardware"].update(peak_flops={"fp32": None}), "profile.hardware.peak_flops"),
    (lambda d: d["hardware"]["peak_flops"].update(int8=math.inf), "profile.hardware.peak_flops.int8"),
    (lambda d: d.update(kind="guessed"), "profile.kind"),
    (lambda d: d.update(kind="projected"), "profile.projected_from"),
    (lambda d: d.update(decode=[]), "profile.decode"),
    (lambda d: d.update(crossover_batch_size=0), "profile.crossover_batch_size"),
])
def test_validation_names_the_field(mutate, field):
    d = synthetic_profile()
    mutate(d)
    with pytest.raises(ValueError) as e:
        validate_profile(d)
    assert str(e.value).startswith(field)


def test_load_checks_schema_version(tmp_path):
    d = synthetic_profile()
    d["schema_version"] = 2
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"p.json: profile.schema_version = 2: this pernode reads version 1"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(path)


def test_published_table_is_complete():
    for name in ("H100 SXM", "H200 SXM", "A100 80GB SXM", "L4", "L40S", "MI300X"):
        spec = PUBLISHED_ACCELERATORS[name]
        assert spec["memory_gb"] > 0 and spec["bandwidth_tbs"] > 0 and spec["bf16_tflops"] > 0
        assert spec["int8_tops"] > 0 and "http" in spec["source"]
        assert "fp8_tflops" in spec
    assert get_accelerator("h100-sxm")["name"] == "H100 SXM"
    with pytest.raises(ValueError, match="'TPU v9'.*H100 SXM"):
        get_accelerator("TPU v9")


def test_projection_scales_memory_bound_point():
    d = synthetic_profile()
    proj = project_profile(d, "H100 SXM")
    assert proj["kind"] == "projected"
    assert proj["projected_from"]["hardware_name"] == "test cpu"
    assert proj["hardware"]["name"] == "H100 SXM" and "nvidia.com" in proj["hardware"]["peak_source"]
    src, dst = d["decode"][0], proj["decode"][0]
    # fp32 decode at B=1 is ~0.5 FLOP/B: memory-bound on the CPU (ridge 7.5) and on the H100 (ridge 67/3.35 = 20),
    # so its time scales by the bandwidth ratio 20 GB/s / 3350 GB/s.
    assert src["bound"] == "memory" and dst["bound"] == "memory"
    assert dst["step_s"] == pytest.approx(src["step_s"] * 20.0 / 3350.0)
    assert dst["fraction_of_peak"] == pytest.approx(0.8)  # the measured efficiency carries over
    assert dst["output_tokens_per_s"] == pytest.approx(1 / dst["step_s"])
    assert dst["measured_step_s"] == src["step_s"]
    # Prefill of 512 tokens is compute-bound on both: it scales by the fp32 FLOP ratio 0.15 / 67 TFLOP/s.
    sp, dp = d["prefill"][1], proj["prefill"][1]
    assert dp["bound"] == "compute"
    assert dp["ttft_s"] == pytest.approx(sp["ttft_s"] * 1.5e11 / 67e12)
    # KV capacity from the H100's memory: 0.9 * 80 GiB minus the weights, in 16-token blocks.
    kv_bytes = int(0.9 * 80 * 2**30 - d["model"]["weight_bytes"])
    assert proj["kv_cache"]["kv_cache_bytes"] == kv_bytes
    assert proj["kv_cache"]["max_tokens"] == kv_bytes // (16 * 46080) * 16
    assert proj["serve_runs"] == [] and proj["memory_high_water_bytes"] is None
    validate_profile(proj)
    with pytest.raises(ValueError, match="project from a measured profile"):
        project_profile(proj, "L4")


def test_projection_when_weights_do_not_fit():
    d = synthetic_profile()
    d["model"]["weight_bytes"] = 30 * 10**9  # pretend a 30 GB model
    proj = project_profile(d, "L4")
    assert proj["kv_cache"]["max_tokens"] == 0
    assert "do not fit" in proj["projected_from"]["warnings"][0]


def test_doc_example_validates():
    # docs/profile_schema.md is the contract: its example must pass the validator.
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "profile_schema.md").read_text()
    example = json.loads(text.split("```json", 1)[1].split("```", 1)[0])
    assert validate_profile(example)["kind"] == "measured"
