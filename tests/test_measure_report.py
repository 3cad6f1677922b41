"""The HTML report: one self-contained file with the charts embedded and the key numbers in it."""
import copy
import re

from pernode.config import ModelConfig
from pernode.measure.profile.profile_schema import (decode_point, kv_cache_section, make_profile, model_section,
                                            prefill_point)
from pernode.measure.profile.projection import project_profile
from pernode.measure.report_html import write_report_html
from pernode.measure.profile.roofline import crossover_batch_size, decode_step_cost, prefill_cost, roofline_time_s

CPU = {"name": "test cpu", "device": "cpu", "memory_bytes": 24 * 2**30, "peak_bandwidth_gbs": 20.0,
       "peak_flops": {"fp32": 1.5e11, "bf16": None, "int8": 6.0e11}, "peak_source": "measured",
       "notes": ["a note from the hardware probe"]}


def synthetic_profile():
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, name="smollm2-135m")
    hw = copy.deepcopy(CPU)
    decode = []
    for ctx in (256, 1024):
        for b in (1, 2, 4, 8, 16, 32):
            cost = decode_step_cost(cfg, [ctx] * b, 4, 4)
            decode.append(decode_point(b, ctx, roofline_time_s(cost.flops, cost.bytes, 20, 1.5e11) / 0.7, cost,
                                       hw, "float32"))
    prefill = []
    for p in (32, 128, 512, 1024):
        cost = prefill_cost(cfg, p, 4, 4)
        prefill.append(prefill_point(p, roofline_time_s(cost.flops, cost.bytes, 20, 1.5e11) / 0.5, cost, hw,
                                     "float32"))
    model = model_section(cfg, "float32")
    return make_profile(model, hw, kv_cache_section(2**30, 16, model["kv_bytes_per_token"], 2048), decode, prefill,
                        crossover_batch_size=crossover_batch_size(cfg, 256, 20, 1.5e11, 4, 4))


def bench_result(scale):
    per_request = [{"index": i, "success": True, "error": "", "prompt_tokens": 10, "output_tokens": 8,
                    "requested_output_tokens": 8, "ttft_s": scale * (0.05 + 0.01 * i), "tpot_s": scale * 0.01,
                    "e2e_s": scale * (0.12 + 0.01 * i), "itl_s": [scale * 0.01] * 7} for i in range(20)]
    per_request.append({"index": 20, "success": False, "error": "HTTP 500: injected", "prompt_tokens": 10,
                        "output_tokens": 0, "requested_output_tokens": 8, "ttft_s": None, "tpot_s": None,
                        "e2e_s": None, "itl_s": []})
    r = {"kind": "bench_serve", "request_rate": "inf", "max_concurrency": 4, "completed": 20, "failed": 1,
         "failed_requests": [{"index": 20, "error": "HTTP 500: injected"}], "duration_s": 1.5,
         "request_throughput_per_s": 13.3, "request_goodput_per_s": None, "output_throughput_tok_s": 106.7,
         "total_token_throughput_tok_s": 240.0, "per_request": per_request}
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            r[f"{stat}_{name}_ms"] = 42.0 * scale
    return r


def test_report_written_with_images_and_numbers(tmp_path):
    profile = synthetic_profile()
    plan = {"title": "Fleet plan", "columns": ["accelerator", "replicas", "$/hour"],
            "rows": [["H100 SXM", 3, 12.5], ["L4 <gpu>", 10, 8.0]]}
    path = write_report_html(tmp_path / "out" / "report.html", profile, [bench_result(1.0), bench_result(2.0)],
                             extra_sections=[plan])
    text = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    # roofline, TPOT vs batch, throughput vs batch, TTFT vs prompt, latency CDFs
    assert len(images) == 5 and all(len(b) > 2000 for b in images)
    assert 'src="http' not in text and "<script" not in text  # self-contained: nothing fetched
    for key in ("smollm2-135m", "test cpu", "134,515,008", "Roofline", "KV cache capacity", "Fleet plan",
                "H100 SXM", "L4 &lt;gpu&gt;", "HTTP 500: injected", "a note from the hardware probe",
                f"{profile['kv_cache']['max_tokens']:,}", f"{profile['crossover_batch_size']:,}"):
        assert key in text, key
    assert "PROJECTED" not in text


def test_projected_report_is_labelled(tmp_path):
    proj = project_profile(synthetic_profile(), "L40S")
    text = write_report_html(tmp_path / "proj.html", proj).read_text()
    assert "PROJECTED" in text and "test cpu" in text and "L40S" in text
    assert text.count("data:image/png;base64,") == 4  # no bench runs, no CDF
