"""Quantization methods, their user errors, and their checkpoints as the engine serves them (tiny models)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from pernode.quant_format import (W8A8_SCHEME, QuantScheme, compute_qparams, dequantize, fake_quantize, mse_qparams,
                                  quantize_weight, quantize_with)
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.kernels.quant_linear import QuantLinear
from pernode.serve.kernels.w8a8_linear import W8A8Linear
from pernode.serve.models.llama import LlamaForCausalLM
from pernode.serve.models.loader import load_model
from pernode.serve.models.registry import resolve_model
from pernode.serve.sampling.params import SamplingParams
from pernode.shrink import AWQ, GPTQ, METHODS, RTN, W8A8, LLMInt8, Recipe, SmoothQuant, method_named, quantize_model
from pernode.shrink.checkpoint import save_quantized
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.shrink.methods.awq import search_scale
from pernode.shrink.methods.gptq import gptq_quantize_weight
from pernode.shrink.methods.smoothquant import search_alpha, simulated_w8a8, smoothing_scale
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("q") / "tiny"), tiny_config())


def _calib(n=2, seq_len=32):
    return torch.randint(0, 49152, (n, seq_len), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def _logits(model, ids):
    return model.lm_head(final_hidden_states(model, ids[None]))


def test_group_size_that_does_not_divide_names_the_layer_and_the_sizes_that_do():
    model = LlamaForCausalLM(tiny_config(hidden_size=96, num_attention_heads=6, head_dim=16, intermediate_size=192,
                                         vocab_size=256))
    with pytest.raises(ValueError, match=r"group_size=64 does not divide the input size 96 of layers\.0\.qkv_proj: "
                                         r"allowed group_size=32"):
        quantize_model(model, RTN(), QuantScheme(4, 64))
    with pytest.raises(ValueError, match="group_size=48 is not supported: allowed"):
        QuantScheme(4, 48)


def test_unknown_method_lists_the_methods(tiny_folder):
    with pytest.raises(ValueError, match="allowed " + ", ".join(METHODS)):
        method_named("bogus")
    with pytest.raises(TypeError, match="allowed a method object"):
        quantize_model(load_model(tiny_folder)[0], "rtn", QuantScheme(8))


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    x = torch.randn(4096, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(4096, 128)
    w = torch.randn(48, 128)
    h = 2 * x.t() @ x / x.shape[0]
    for scheme in (QuantScheme(4, 32), QuantScheme(4, None, symmetric=False)):
        rtn = ((x @ (w - fake_quantize(w, scheme)).t()) ** 2).mean()
        for act_order in (False, True):
            q, s, z = gptq_quantize_weight(w, h, scheme, act_order=act_order)
            gptq = ((x @ (w - dequantize(q, s, z, scheme.group_size)).t()) ** 2).mean()
            assert gptq < 0.8 * rtn, (scheme, act_order, gptq, rtn)


def _outlier_weights(n=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.01  # ~1% outliers at 4-8x the typical magnitude
    return torch.where(mask, w * (4 + 4 * torch.rand(n, k, generator=g)), w)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 64), QuantScheme(4, 32, symmetric=False), QuantScheme(4),
                                    QuantScheme(8, 64)])
def test_mse_observer_never_loses_to_min_max_and_wins_with_outliers(scheme):
    w = _outlier_weights()

    def group_err(scale, zero):
        dq = dequantize(quantize_with(w, scale, zero, scheme), scale, zero, scheme.group_size)
        return (w - dq).pow(2).reshape(w.shape[0], -1, scheme.group_size or w.shape[1]).sum(-1)

    s0, z0 = compute_qparams(w, scheme)
    s1, z1 = mse_qparams(w, scheme, norm=2.0)
    assert s1.shape == s0.shape and (z1 is None) == (z0 is None)
    assert torch.all(s1 <= s0 * (1 + 1e-6))  # only ever shrinks the range
    minmax, mse = group_err(s0, z0), group_err(s1, z1)
    assert torch.all(mse <= minmax * (1 + 1e-5))  # per group: shrink 1.0 (min-max) is in the grid
    assert mse.sum() < 0.98 * minmax.sum(), (mse.sum(), minmax.sum())  # measured 0.63-0.972 of min-max


def test_mse_observer_column_weights_steer_the_error():
    w = _outlier_weights(32, 64)
    scheme = QuantScheme(4, 64)
    cw = torch.ones(64)
    cw[:8] = 100.0  # the first 8 columns matter most

    def err(scale, zero):
        return (w - dequantize(quantize_with(w, scale, zero, scheme), scale, zero, 64)).pow(2)

    plain, weighted = err(*mse_qparams(w, scheme, norm=2.0)), err(*mse_qparams(w, scheme, norm=2.0, col_weight=cw))
    assert (weighted * cw).sum() <= (plain * cw).sum()
    assert weighted[:, :8].sum() < plain[:, :8].sum()


def test_gptq_with_mse_observers_beats_min_max_gptq():
    torch.manual_seed(0)
    x = torch.randn(4096, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(4096, 128)
    x = x * torch.logspace(-0.5, 0.5, 128)  # uneven input channels, so act-order has something to order
    w = _outlier_weights(48, 128, seed=1)
    h = 2 * x.t() @ x / x.shape[0]

    def out_err(q, s, z, scheme):
        return ((x @ (w - dequantize(q, s, z, scheme.group_size)).t()) ** 2).mean()

    for scheme in (QuantScheme(4, 64), QuantScheme(4, 32, symmetric=False)):
        rtn = out_err(*quantize_weight(w, scheme), scheme)
        base = out_err(*gptq_quantize_weight(w, h, scheme, observer="minmax", act_order=False), scheme)
        for act_order in (False, True):
            for observer in ("mse", "hmse"):
                best = out_err(*gptq_quantize_weight(w, h, scheme, act_order=act_order, observer=observer), scheme)
                assert best < 0.97 * base and base < 0.9 * rtn, (scheme, act_order, observer, best, base, rtn)
    with pytest.raises(ValueError, match="observer='bogus': allowed minmax, mse, hmse"):
        gptq_quantize_weight(w, h, QuantScheme(4, 64), observer="bogus")


def test_gptq_raises_damping_when_cholesky_fails(caplog):
    x = torch.randn(256, 8) @ torch.randn(8, 64)  # rank 8 of 64 -> singular without damping
    h = 2 * x.t() @ x / 256
    with caplog.at_level(logging.WARNING, logger="pernode.shrink"):
        q, _, _ = gptq_quantize_weight(torch.randn(16, 64), h, QuantScheme(4, 32), damp_ratio=0.0)
    assert "raising damping" in caplog.text and q.shape == (16, 64)


def test_awq_scale_search_never_loses_to_plain_rounding():
    torch.manual_seed(0)
    x = torch.randn(512, 128) * torch.logspace(-1, 1, 128)
    w = torch.randn(64, 128)
    scheme = QuantScheme(4, 32)
    s, _ = search_scale(x, w, scheme)
    ref = x @ w.t()
    awq = (((x / s) @ fake_quantize(w * s, scheme).t() - ref) ** 2).mean()
    rtn = ((x @ fake_quantize(w, scheme).t() - ref) ** 2).mean()
    assert awq <= rtn


def test_int4_checkpoint_layout_and_engine_serving(tiny_folder, tmp_path):
    scheme = QuantScheme(4, 32, symmetric=False)
    model, source = load_model(tiny_folder)
    recipe = Recipe("rtn-int4-g32-asym", scheme, RTN())
    recipe.apply(model)
    out = save_quantized(model, source, str(tmp_path / "int4"), recipe)

    cfg = json.load(open(f"{out}/config.json"))["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"]
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        names = set(f.keys())
        prefix = "model.layers.0.self_attn.k_proj"
        assert f.get_tensor(f"{prefix}.weight_packed").dtype == torch.int32
        assert tuple(f.get_tensor(f"{prefix}.weight_packed").shape) == (32, 64 // 8)
        assert tuple(f.get_tensor(f"{prefix}.weight_scale").shape) == (32, 2)
        assert tuple(f.get_tensor(f"{prefix}.weight_zero_point").shape) == (32, 2)
        assert f.get_tensor(f"{prefix}.weight_shape").tolist() == [32, 64]
    assert Recipe.from_dict(cfg["pernode_recipe"]) == recipe
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert not any(n.endswith("proj.weight") for n in names)

    source2 = resolve_model(out)
    assert source2.quantization_config == cfg
    reloaded, _ = load_model(out)
    assert isinstance(reloaded.layers[1].mlp.gate_up_proj, QuantLinear)
    ids = torch.arange(100, 140)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))

    engine = LLMEngine(model=out, num_blocks=32)
    assert isinstance(engine.model.layers[0].self_attn.qkv_proj, QuantLinear)
    engine.add_request("a", "The capital of France is", SamplingParams(max_tokens=4, temperature=0.0))
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert len(outputs[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("modifier,scheme", [(GPTQ(), QuantScheme(4, 32)), (AWQ(), QuantScheme(4, 32)),
                                             (SmoothQuant(), W8A8_SCHEME), (LLMInt8(), W8A8_SCHEME),
                                             (W8A8(), W8A8_SCHEME), (RTN(), QuantScheme(8))])
def test_methods_round_trip_through_their_checkpoint(tiny_folder, tmp_path, modifier, scheme):
    method = modifier.name
    model, source = load_model(tiny_folder)
    fp_logits = _logits(model, torch.arange(200, 232))
    report = quantize_model(model, modifier, scheme, _calib(), quiet=True)
    out = save_quantized(model, source, str(tmp_path / method), Recipe(method, scheme, modifier))
    reloaded, _ = load_model(out)
    layer_type = W8A8Linear if scheme.activations else QuantLinear
    assert isinstance(reloaded.layers[0].mlp.down_proj, layer_type)
    ids = torch.arange(200, 232)
    q_logits = _logits(reloaded, ids)
    torch.testing.assert_close(q_logits, _logits(model, ids))
    # quantization perturbs but does not wreck the tiny model's predictions
    assert (q_logits - fp_logits).abs().mean() < 0.25 * fp_logits.abs().mean()
    if method == "llm-int8":
        assert reloaded.layers[0].mlp.down_proj.outlier_threshold == 6.0
        assert report["outliers"] and all("mean_outlier_columns" in v for v in report["outliers"].values())


def test_qwen2_biases_survive_quantization(tmp_path):
    folder = write_tiny_model(str(tmp_path / "qwen"), tiny_config("qwen2"))
    model, source = load_model(folder)
    with torch.no_grad():
        model.layers[0].self_attn.qkv_proj.bias.normal_()
    quantize_model(model, RTN(), QuantScheme(8))
    out = save_quantized(model, source, str(tmp_path / "q"), Recipe("rtn-int8", QuantScheme(8), RTN()))
    reloaded, _ = load_model(out)
    ids = torch.arange(10, 30)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_smoothquant_alpha_search_never_loses_to_the_default_on_its_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 40.0  # an outlier channel, as in LLM activations
    w = torch.randn(48, 64, generator=g) * 0.05
    absmax = x.abs().amax(0)
    ref = x @ w.t()

    def err(s):
        return (simulated_w8a8(x / s, w * s) - ref).pow(2).mean().item()

    alpha, s = search_alpha(x, w, absmax)
    assert 0.0 <= alpha <= 1.0
    assert err(s) <= err(smoothing_scale(absmax, w, 0.5)) + 1e-12
    assert err(s) < err(torch.ones(64))  # smoothing beats none with an outlier channel


def test_smoothquant_auto_alpha_reports_its_choices(tiny_folder):
    model, _ = load_model(tiny_folder)
    report = quantize_model(model, SmoothQuant(alpha="auto"), W8A8_SCHEME, _calib(), quiet=True)
    assert set(report["alpha_chosen"]) == {"qkv_proj", "gate_up_proj", "down_proj"}
    assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in report["alpha_chosen"].values())
    with pytest.raises(ValueError, match=r"alpha=1.5: allowed a number in 0..1"):
        SmoothQuant(alpha=1.5)
