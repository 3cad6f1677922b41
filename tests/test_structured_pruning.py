"""Structured pruning: the sliced model's output equals the dense model with the same heads / KV groups / FFN
channels / layers masked out, its shapes are consistent, and the engine serves it."""
from __future__ import annotations

import copy

import pytest
import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.distill.student_checkpoint import save_student
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.shrink.structured import ActivationImportance, PruningPlan, measure_importance, prune_model
from pernode.shrink.structured.plan import non_embedding_params
from pernode.shrink.structured.prune import kept_heads
from tiny_model import tiny_config, write_tiny_model

LAYERS, HEADS, KV, FFN, HD = 3, 4, 2, 128, 16


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("dense")), tiny_config(num_hidden_layers=LAYERS))
    return load_model(folder)


def _importance() -> ActivationImportance:
    """Hand-made scores: the kept sets are known without running the ranking under test."""
    heads = torch.tensor([[0.1, 0.9, 0.5, 0.4],  # group 0 = heads 0,1 (sum 1.0), group 1 = heads 2,3 (sum 0.9)
                          [0.8, 0.1, 0.3, 0.9],  # group 0 = 0.9, group 1 = 1.2
                          [0.2, 0.3, 0.7, 0.1]], dtype=torch.float64)
    ffn = torch.stack([torch.randperm(FFN, generator=torch.Generator().manual_seed(i)).double() for i in range(LAYERS)])
    return ActivationImportance(heads=heads, ffn=ffn, layers=torch.tensor([0.5, 0.1, 0.4], dtype=torch.float64))


def _masked(model, keep_heads: list[list[int]], keep_channels: list[list[int]], keep_layers: list[int]):
    """The dense model with pruned heads' o_proj columns, pruned channels' gate/up rows and dropped layers'
    output projections zeroed: what the pruned model must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.layers):
            if i not in keep_layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            for h in range(HEADS):
                if h not in keep_heads[i]:
                    layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
            for ch in range(FFN):
                if ch not in keep_channels[i]:
                    layer.mlp.gate_up_proj.weight[ch] = 0
                    layer.mlp.gate_up_proj.weight[FFN + ch] = 0
    return ref


def _logits(model, windows):
    return model.lm_head(final_hidden_states(model, windows))  # the engine's own forward (paged KV cache)


def _top(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k])


@pytest.mark.parametrize("plan, heads_kept", [
    (PruningPlan(heads=2, ffn=64), [[1, 2], [0, 3], [1, 2]]),  # one query head per group, every group kept
    (PruningPlan(heads=2, kv_heads=1), [[0, 1], [2, 3], [2, 3]]),  # whole KV groups go with their heads
    (PruningPlan(heads=1, kv_heads=1, ffn=32, layers=2), [[1], [3], [2]]),  # all at once
])
def test_pruned_model_equals_the_masked_dense_model(dense, plan, heads_kept):
    model, _ = dense
    importance = _importance()
    pruned = prune_model(model, plan, importance)
    target = plan.target_config(model.config)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads, pruned.config.intermediate_size,
            pruned.config.num_hidden_layers) == (target.num_attention_heads, target.num_key_value_heads,
                                                 target.intermediate_size, target.num_hidden_layers)
    for layer in pruned.layers:  # every tensor has the shape the config says
        q, kv = target.num_attention_heads * HD, target.num_key_value_heads * HD
        assert layer.self_attn.qkv_proj.weight.shape == (q + 2 * kv, 64)
        assert layer.self_attn.o_proj.weight.shape == (64, q)
        assert layer.mlp.gate_up_proj.weight.shape == (2 * target.intermediate_size, 64)
        assert layer.mlp.down_proj.weight.shape == (64, target.intermediate_size)
    keep_layers = [0, 2] if plan.layers == 2 else [0, 1, 2]
    channels = [_top(importance.ffn[i], target.intermediate_size) for i in range(LAYERS)]
    for i in keep_layers:
        assert kept_heads(importance.heads[i], KV, target.num_key_value_heads, target.num_attention_heads)[1] == \
            heads_kept[i]
    reference = _masked(model, heads_kept, channels, keep_layers)
    windows = torch.randint(100, 5000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(_logits(pruned, windows), _logits(reference, windows), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(_logits(pruned, windows), _logits(model, windows), atol=1e-3)
    assert non_embedding_params(pruned.config) < non_embedding_params(model.config)


def test_pruned_checkpoint_is_served_by_the_engine(dense, tmp_path):
    from pernode.serve.llm import LLM
    from pernode.serve.sampling.params import SamplingParams

    model, source = dense
    windows = torch.randint(100, 5000, (4, 32), generator=torch.Generator().manual_seed(0))
    importance = measure_importance(model, windows)  # real activations
    assert importance.heads.shape == (LAYERS, HEADS) and importance.ffn.shape == (LAYERS, FFN)
    assert (importance.heads > 0).all() and (importance.layers > 0).all()
    pruned = prune_model(model, PruningPlan(heads=2, ffn=96, layers=2), importance)
    folder = save_student(pruned, source, str(tmp_path / "pruned"))
    reloaded, _ = load_model(folder)
    assert reloaded.config.intermediate_size == 96 and reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(_logits(reloaded, windows), _logits(pruned, windows))
    out = LLM(folder, num_blocks=16).generate("import os", SamplingParams(max_tokens=4, temperature=0.0,
                                                                         ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_plans_name_bad_fields():
    config = tiny_config(num_hidden_layers=LAYERS)
    assert PruningPlan.parse("ffn=64, heads=2,kv-heads=1") == PruningPlan(heads=2, kv_heads=1, ffn=64)
    with pytest.raises(ValueError, match="'width=3' is not KEY=INT"):
        PruningPlan.parse("width=3")
    with pytest.raises(ValueError, match="ffn=500 is out of range: allowed 1..128"):
        PruningPlan(ffn=500).target_config(config)
    with pytest.raises(ValueError, match="heads=3 is not allowed: it must be a multiple of kv_heads=2"):
        PruningPlan(heads=3).target_config(config)
    with pytest.raises(ValueError, match="heads=4 is out of range: allowed 1..2"):
        PruningPlan(heads=4, kv_heads=1).target_config(config)
    with pytest.raises(ValueError, match="importance is required"):
        prune_model(_ConfigOnly(config), PruningPlan(ffn=64))


class _ConfigOnly:
    def __init__(self, config):
        self.config = config


def test_least_squares_refit_reduces_each_layers_error(dense):
    from pernode.shrink.structured.refit import refit_output_projections

    model, _ = dense
    windows = torch.randint(100, 5000, (8, 48), generator=torch.Generator().manual_seed(1))
    pruned = prune_model(model, PruningPlan(heads=2, ffn=48), _importance())
    report = refit_output_projections(model, pruned, [0, 1, 2], windows)
    for layer in report:
        assert layer["attn_error"][1] < layer["attn_error"][0]
        assert layer["mlp_error"][1] < layer["mlp_error"][0]
    # nothing pruned: the dense weights are already the least-squares solution, and stay (up to the ridge)
    same = prune_model(model, PruningPlan(), None)
    report = refit_output_projections(model, same, [0, 1, 2], windows)
    assert all(layer["mlp_error"][1] < 1e-2 for layer in report)
    with torch.no_grad():
        a, b = _logits(same, windows), _logits(model, windows)
    assert float((a - b).norm() / b.norm()) < 1e-2
    with pytest.raises(ValueError, match="refit_windows: 96 calibration tokens"):
        refit_output_projections(model, same, [0, 1, 2], windows[:2])


def test_distillation_student_can_start_from_the_refitted_pruned_model(dense):
    from pernode.shrink.distill.student import StudentSpec, build_student
    from pernode.shrink.evaluate.perplexity import calibration_windows
    model, source = dense
    windows = calibration_windows(source.tokenizer, 64, 8)
    width = PruningPlan(ffn=FFN // 2)
    plain, _ = build_student(model, StudentSpec(width=width), windows)
    refit, layers = build_student(model, StudentSpec(width=width, refit_windows=8), windows)
    assert layers == list(range(LAYERS))
    expected = prune_model(model, PruningPlan(ffn=FFN // 2, layers=LAYERS), measure_importance(model, windows),
                           refit_windows=windows)
    for a, b, c in zip(refit.layers, expected.layers, plain.layers):
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
        assert not torch.equal(a.mlp.down_proj.weight, c.mlp.down_proj.weight)
    with pytest.raises(ValueError, match=r"refit_windows=4: allowed 0, or >= 1 with a width to prune"):
        StudentSpec(refit_windows=4)
