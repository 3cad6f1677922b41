"""A quantized lm_head (`pernode quantize --quantize-lm-head`): untied, int8 per group of 32, saved as its own
compressed-tensors config group, served by the engine."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pernode.cli import main
from pernode.quant_format import QuantScheme, dequantize, quantize_weight
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.kernels.quant_linear import QuantLinear
from pernode.serve.models.loader import load_model
from pernode.serve.sampling.params import SamplingParams
from pernode.shrink import RTN, Recipe
from pernode.shrink.checkpoint import save_quantized
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.shrink.methods.lm_head import LM_HEAD_SCHEME
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("lm") / "tiny"), tiny_config())


@torch.inference_mode()
def _logits(model, ids):
    return model.lm_head(final_hidden_states(model, ids[None]))


def test_quantized_lm_head_round_trips_and_serves(tiny_folder, tmp_path):
    model, source = load_model(tiny_folder)
    ids = torch.arange(300, 340)
    fp_logits = _logits(model, ids)
    embedding = model.embed_tokens.weight.detach().clone()
    recipe = Recipe("rtn-int4-g32+lm8", QuantScheme(4, 32), RTN(), lm_head=LM_HEAD_SCHEME)
    recipe.apply(model)  # the method, then the lm_head step
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme == LM_HEAD_SCHEME
    assert not model.config.tie_word_embeddings and source.config.tie_word_embeddings  # a copy, not the source's
    assert torch.equal(model.embed_tokens.weight, embedding)  # the lookup table stays float
    out = save_quantized(model, source, str(tmp_path / "q"), recipe)

    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["tie_word_embeddings"] is False
    qc = cfg["quantization_config"]
    assert qc["ignore"] == [] and qc["format"] == "mixed-precision"
    head = qc["config_groups"]["group_1"]
    assert head["targets"] == ["lm_head"] and head["format"] == "int-quantized"
    assert {k: head["weights"][k] for k in ("num_bits", "strategy", "group_size", "symmetric")} == \
        {"num_bits": 8, "strategy": "group", "group_size": 32, "symmetric": True}
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.int8
        assert tuple(f.get_tensor("lm_head.weight_scale").shape) == (49152, 64 // 32)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32

    reloaded, _ = load_model(out)
    assert isinstance(reloaded.lm_head, QuantLinear)
    q_logits = _logits(reloaded, ids)
    torch.testing.assert_close(q_logits, _logits(model, ids))
    assert (q_logits - fp_logits).abs().mean() < 0.25 * fp_logits.abs().mean()

    engine = LLMEngine(model=out, num_blocks=32)
    assert isinstance(engine.model.lm_head, QuantLinear)
    engine.add_request("a", "The capital of France is", SamplingParams(max_tokens=4, temperature=0.0))
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert len(outputs[0].outputs[0].token_ids) == 4


def test_int8_g32_lm_head_is_lossless_on_a_q8_0_grid():
    """Weights already on GGUF Q8_0's grid (int8 x one scale per 32) come back exactly: the packaged SmolLM2's
    embedding is Q8_0, so quantizing its lm_head this way costs nothing."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 96), generator=g, dtype=torch.int8)
    q[:, ::32] = 127  # every Q8_0 block reaches +-127: its scale is amax / 127
    d = torch.rand(64, 3, generator=g).half().float()
    w = dequantize(q, d, None, 32)
    q2, s2, _ = quantize_weight(w, LM_HEAD_SCHEME)
    torch.testing.assert_close(dequantize(q2, s2, None, 32), w, rtol=1e-6, atol=0)


def test_cli_quantize_lm_head(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["quantize", "--model", tiny_folder, "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--quantize-lm-head", "--out", out]) == 0
    assert "w4-g32 + int8-g32 lm_head" in capsys.readouterr().out
    model, _ = load_model(out)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme.num_bits == 8


def test_cli_quantize_with_own_calibration_file(tiny_folder, tmp_path, caplog):
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text of the user's own, about ships and harbours.\n" * 40)
    out = str(tmp_path / "gptq")
    assert main(["quantize", "--model", tiny_folder, "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", str(calib), "--calib-windows", "2", "--calib-seq-len", "64", "--out", out]) == 0
    details = json.load(open(f"{out}/config.json"))["quantization_config"]["pernode_details"]
    assert details["calibration_tokens"] == 2 * 64
    assert main(["quantize", "--model", tiny_folder, "--method", "gptq", "--calib", str(calib),
                 "--corpus", str(calib), "--out", out]) == 2
    assert "--calib FILE" in caplog.text


def test_bench_offline_on_a_quantized_checkpoint_skips_hf(tiny_folder, tmp_path, caplog):
    import argparse
    import logging

    from pernode.serve.llm import LLM
    from pernode.cli.bench import add_offline_arguments, offline_config_from_args
    from pernode.measure.bench import bench_offline
    from pernode.serve.models.registry import resolve_model

    model, source = load_model(tiny_folder)
    recipe = Recipe("rtn-int4-g32", QuantScheme(4, 32), RTN())
    recipe.apply(model)
    out = save_quantized(model, source, str(tmp_path / "q"), recipe)
    p = argparse.ArgumentParser()
    add_offline_arguments(p)
    args = p.parse_args(["--num-prompts", "3", "--input-len", "8:16", "--output-len", "4", "--peers", "hf"])
    with caplog.at_level(logging.INFO, logger="pernode.bench"):
        results = bench_offline.run_bench_offline(LLM(out, num_blocks=64), resolve_model(out),
                                                  offline_config_from_args(args))
    assert [r.system for r in results] == ["pernode"] and results[0].output_tokens == 3 * 4
    assert "HF transformers skipped" in caplog.text
