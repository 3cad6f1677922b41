"""Pruning methods on a tiny model with real text: exact sparsity and N:M patterns, the methods' layer
reconstruction error in the papers' order, OWL's allocation, joint SparseGPT + GPTQ, and their user errors."""
from __future__ import annotations

import pytest
import torch

from pernode.quant_format import QuantScheme
from pernode.serve.models.loader import load_model
from pernode.shrink.calibration import capture_inputs
from pernode.shrink.evaluate.perplexity import Forward, calibration_windows
from pernode.shrink.methods import GPTQ, RTN
from pernode.shrink.methods.common import projections
from pernode.shrink.pruning import Magnitude, SparseGPT, Wanda, pruner_from_dict, pruner_named
from pernode.shrink.pruning.masks import follows_pattern, keep_mask
from pernode.shrink.pruning.owl import owl_sparsities
from pernode.shrink.recipes import Recipe
from pernode.sparse_format import SparsityPattern
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("prune") / "tiny"),
                              tiny_config(num_hidden_layers=2, hidden_size=64, intermediate_size=128))
    return folder


@pytest.fixture(scope="module")
def calib(tiny_folder):
    """Real text (the calibration split of the pydoc topics) as 4 windows of 64 tokens."""
    return calibration_windows(load_model(tiny_folder)[1].tokenizer, 64, 4)


def _with_outlier_features(model, seed=0):
    """Give the input norms a few large channels, as trained LLMs have (their activation outliers): the regime
    where activation-aware pruning differs from magnitude."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.exp(torch.randn(norm.weight.shape, generator=g)))
    return model


def _projection_zeros(model):
    return {f"{i}.{attr}": lin.weight for i, layer in enumerate(model.layers) for _, attr, lin in projections(layer)}


@pytest.mark.parametrize("pruner", [Magnitude(0.5), Wanda(0.3), SparseGPT(0.6), Magnitude(0.5, "2:4"),
                                    Wanda(0.5, "4:8"), SparseGPT(0.5, "2:4"), SparseGPT(0.75, "1:4")])
def test_masks_have_exactly_the_requested_sparsity_and_pattern(tiny_folder, calib, pruner):
    model = load_model(tiny_folder)[0]
    report = Recipe("p", pruner=pruner).apply(model, calib, quiet=True)
    pattern = pruner.sparsity_pattern
    for name, w in _projection_zeros(model).items():
        zeros = int((w == 0).sum())
        assert zeros == round(pruner.sparsity * w.numel()), (name, zeros, w.numel())
        if pattern.is_structured:
            assert follows_pattern(w, pattern), name
            per_group = (w != 0).reshape(w.shape[0], -1, pattern.m).sum(-1)
            assert (per_group == pattern.n).all(), name
        elif not isinstance(pruner, SparseGPT):  # magnitude and Wanda compare within each output row
            per_row = (w == 0).sum(1)
            assert int(per_row.max() - per_row.min()) <= 1, name
    assert report["pruning"]["layer_sparsity"] == [pruner.sparsity] * 2


def test_keep_mask_ties_and_shapes():
    scores = torch.ones(3, 8)  # all tied: still exactly the count
    assert int((~keep_mask(scores, 0.5, SparsityPattern())).sum()) == 12
    with pytest.raises(ValueError, match="pattern 2:4 needs an input size divisible by 4, got 6"):
        keep_mask(torch.ones(2, 6), 0.5, SparsityPattern(2, 4))


def _layer_inputs(model, calib, layer_index, attr):
    fwd = Forward.build(model, *calib.shape)
    x = model.embed_tokens(calib.flatten())
    captured = []
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if i == layer_index:
                with capture_inputs({attr: getattr(layer.self_attn, attr, None) or getattr(layer.mlp, attr)},
                                    lambda name, inp: captured.append(inp.float())):
                    fwd.layer(layer, x)
                break
            x = fwd.layer(layer, x)
    return captured[0]


@pytest.mark.parametrize("layer_index,attr", [(0, "qkv_proj"), (1, "down_proj"), (1, "o_proj")])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_better_than_magnitude(tiny_folder, calib, layer_index, attr,
                                                                         pattern):
    model = _with_outlier_features(load_model(tiny_folder)[0])
    x = _layer_inputs(model, calib, layer_index, attr)
    layer = model.layers[layer_index]
    w = (getattr(layer.self_attn, attr, None) or getattr(layer.mlp, attr)).weight.data.clone()
    hessian = 2 * x.t() @ x / x.shape[0]
    errors = {}
    for pruner in (Magnitude(0.5, pattern), Wanda(0.5, pattern), SparseGPT(0.5, pattern)):
        stats = torch.diagonal(hessian) if isinstance(pruner, Wanda) else hessian
        pruned, keep = pruner.prune_weight(w, stats, 0.5, attr)
        assert torch.equal(pruned == 0, ~keep | (w == 0))
        errors[pruner.name] = float(((x @ (w - pruned).t()) ** 2).mean())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_owl_keeps_the_mean_and_gives_outlier_layers_more_weights():
    s = owl_sparsities([0.01, 0.05, 0.02, 0.10], target=0.5, spread=0.08)
    assert sum(s) / 4 == pytest.approx(0.5)
    assert s[3] == min(s) and s[0] == max(s)  # most outliers -> least sparse
    assert max(s) - min(s) == pytest.approx(0.16)


def test_owl_on_a_model_keeps_the_mean_sparsity(tiny_folder, calib):
    model = _with_outlier_features(load_model(tiny_folder)[0], seed=3)
    report = Recipe("p", pruner=Wanda(0.5, layerwise="owl", owl_spread=0.05)).apply(model, calib, quiet=True)
    per_layer = report["pruning"]["layer_sparsity"]
    assert sum(per_layer) / len(per_layer) == pytest.approx(0.5, abs=1e-3)
    assert per_layer[0] != per_layer[1]
    zeros = sum(int((w == 0).sum()) for w in _projection_zeros(model).values())
    total = sum(w.numel() for w in _projection_zeros(model).values())
    assert zeros / total == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("quantizer", [GPTQ(), RTN()])
def test_pruned_then_quantized_keeps_exact_zeros(tiny_folder, calib, quantizer):
    model = load_model(tiny_folder)[0]
    recipe = Recipe("p", QuantScheme(4, 32, symmetric=False), quantizer, pruner=SparseGPT(0.5, "2:4"))
    recipe.apply(model, calib, quiet=True)
    for layer in model.layers:
        for module in (layer.self_attn.qkv_proj, layer.mlp.down_proj):
            w = module.dequantized_weight()
            assert follows_pattern(w, SparsityPattern(2, 4))
            assert int((w == 0).sum()) >= w.numel() // 2


def test_joint_sparsegpt_gptq_beats_pruning_then_rounding(tiny_folder, calib):
    """SparseGPT + GPTQ in one pass against SparseGPT then round-to-nearest: the joint pass pushes the rounding error
    of the survivors onto later columns, so the layer outputs stay closer to the dense model's."""
    from pernode.shrink.evaluate.perplexity import final_hidden_states

    dense = load_model(tiny_folder)[0]
    with torch.inference_mode():
        ref = final_hidden_states(dense, calib)
    errs = {}
    for name, quantizer in (("joint", GPTQ()), ("rtn", RTN())):
        model = load_model(tiny_folder)[0]
        Recipe(name, QuantScheme(4, 32), quantizer, pruner=SparseGPT(0.5)).apply(model, calib, quiet=True)
        with torch.inference_mode():
            errs[name] = float(((final_hidden_states(model, calib) - ref) ** 2).mean())
    assert errs["joint"] < errs["rtn"], errs


def test_user_errors_name_the_field_and_the_range():
    with pytest.raises(ValueError, match=r"sparsity=1.5: allowed 0 < sparsity < 1"):
        Magnitude(1.5)
    with pytest.raises(ValueError, match=r"sparsity=0.3: allowed 0.5 with pattern 2:4"):
        Wanda(0.3, "2:4")
    with pytest.raises(ValueError, match=r"pattern='2-4': allowed N:M such as 2:4"):
        Wanda(0.5, "2-4")
    with pytest.raises(ValueError, match=r"layerwise='owl': allowed uniform with pattern 2:4"):
        SparseGPT(0.5, "2:4", layerwise="owl")
    with pytest.raises(ValueError, match=r"owl_spread=0.3: allowed 0 <= owl_spread < 0.2"):
        Wanda(0.8, layerwise="owl", owl_spread=0.3)
    with pytest.raises(ValueError, match=r"pruning method 'wanda' has no option 'damp_ratio' \(it is an option of "
                                         r"sparsegpt\)"):
        pruner_named("wanda", damp_ratio=0.1)
    with pytest.raises(ValueError, match=r"method='obs' is not a pruning method: allowed magnitude, wanda, sparsegpt"):
        pruner_named("obs")
    with pytest.raises(ValueError, match=r"calibration=None: allowed token windows"):
        Wanda(0.5).apply(None, None)


def test_recipe_round_trips_with_its_pruner():
    recipe = Recipe("x", QuantScheme(4, 64), GPTQ(), pruner=SparseGPT(0.5, layerwise="owl"))
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and again.method == "sparsegpt+gptq" and again.label == "sparse 50% owl w4-g64"
    assert pruner_from_dict(SparseGPT(0.5, "2:4").to_dict()) == SparseGPT(0.5, "2:4")


def test_sensitivity_allocation_keeps_the_mean_and_spares_the_layer_that_turns_its_input_most(tiny_folder, calib):
    from pernode.shrink.structured import measure_importance
    model = _with_outlier_features(load_model(tiny_folder)[0], seed=5)
    block = measure_importance(model, calib).layers
    pruner = SparseGPT(0.5, layerwise="sensitivity", owl_spread=0.1)
    assert pruner.needs_calibration and pruner.label() == "50% sensitivity"
    report = Recipe("p", pruner=pruner).apply(model, calib, quiet=True)
    per_layer = report["pruning"]["layer_sparsity"]
    assert sum(per_layer) / len(per_layer) == pytest.approx(0.5, abs=1e-3)
    assert max(per_layer) - min(per_layer) == pytest.approx(0.2, abs=1e-3)
    assert per_layer[int(block.argmax())] == min(per_layer)
    with pytest.raises(ValueError, match=r"owl_spread=0.6: allowed 0 <= owl_spread < 0.5"):
        SparseGPT(0.5, layerwise="sensitivity", owl_spread=0.6)


def test_dense_target_refit_is_the_identity_without_drift_and_fits_the_dense_outputs_with_it():
    from pernode.shrink.pruning.dense_target import refit_to_dense_target
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=g)
    x_dense = torch.randn(512, 32, generator=g) * torch.linspace(0.1, 3, 32)
    drift = torch.eye(32) + 0.2 * torch.randn(32, 32, generator=g)  # what the earlier pruned layers changed
    x_pruned = x_dense @ drift + 0.1 * torch.randn(512, 32, generator=g)
    h, c = 2 * x_pruned.t() @ x_pruned / 512, 2 * x_dense.t() @ x_pruned / 512
    h_dense = 2 * x_dense.t() @ x_dense / 512
    assert torch.allclose(refit_to_dense_target(w, h_dense, h_dense, 0.01), w, atol=1e-4)
    refit = refit_to_dense_target(w, h, c, 0.01)

    def error(v):
        return float(((x_dense @ w.t() - x_pruned @ v.t()) ** 2).mean())
    assert error(refit) < 0.2 * error(w)


def test_dense_target_pruning_keeps_exact_sparsity(tiny_folder, calib):
    model = load_model(tiny_folder)[0]
    pruner = SparseGPT(0.5, "2:4", target="dense")
    assert pruner.label() == "2:4 dense-target" and pruner.needs_calibration
    Recipe("p", pruner=pruner).apply(model, calib, quiet=True)
    for name, w in _projection_zeros(model).items():
        assert int((w == 0).sum()) == w.numel() // 2 and follows_pattern(w, pruner.sparsity_pattern), name
    with pytest.raises(ValueError, match=r"target='teacher': allowed pruned"):
        SparseGPT(0.5, target="teacher")


def test_dense_target_statistics_match_the_pruners_hessians(tiny_folder, calib):
    """Each projection's H is the one layer_hessians accumulates, and C = H where nothing drifted (layer 0)."""
    from pernode.shrink.calibration import ChunkedForward
    from pernode.shrink.methods.gptq import layer_hessians
    from pernode.shrink.pruning.dense_target import cross_statistics
    model = load_model(tiny_folder)[0]
    fwd = ChunkedForward(model, calib.shape[0], calib.shape[1], 2)
    x = model.embed_tokens(calib.flatten())
    layer = model.layers[0]
    pairs = cross_statistics(layer, x, x.clone(), fwd)
    expected = layer_hessians(layer, x, fwd, stop_early=False)
    assert set(pairs) == set(expected)
    for attr, (h, c) in pairs.items():
        assert torch.allclose(h, expected[attr], rtol=1e-4, atol=1e-5), attr
        assert torch.allclose(c, h, rtol=1e-4, atol=1e-5), attr
