"""Sparse KD recovery (prune, then distill from the dense model with the masks fixed) on a tiny model: the masks
survive training exactly (count and N:M pattern), the KD loss falls, the recovered model round-trips through a
sparse checkpoint, and `pernode prune --recover-kd` quantizes after recovering."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pernode.serve.models.loader import load_model
from pernode.shrink.checkpoint import save_checkpoint
from pernode.shrink.distill.losses import distillation_loss
from pernode.shrink.evaluate.perplexity import final_hidden_states
from pernode.shrink.methods.common import projections, pruned_mask
from pernode.shrink.pruning import Magnitude
from pernode.shrink.distill.sparse_recovery import KDRecovery, kd_windows, recover, teacher_cache
from pernode.shrink.pruning.masks import follows_pattern
from pernode.shrink.recipes import Recipe
from pernode.shrink.training_forward import logits
from pernode.sparse_format import SparsityPattern
from tiny_model import tiny_config, write_tiny_model

RECOVERY = KDRecovery(steps=12, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, dtype="fp32",
                      checkpoint_every=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("kd") / "tiny"), tiny_config())


def _prune_with_teacher(tiny_folder, tmp_path, pruner, recovery=RECOVERY, max_windows=None, peaked=False):
    """The dense model's cache on the KD windows, then the model pruned in place (the order `pernode prune` uses).
    `peaked`: the final norm scaled up, so the random teacher's distribution is as peaked as a trained model's."""
    model, source = load_model(tiny_folder)
    if peaked:
        model.norm.weight.data.mul_(8)
    windows, _ = kd_windows(source.tokenizer, recovery)
    windows = windows[:max_windows]
    cache = teacher_cache(model, windows, str(tmp_path / "cache"), recovery, "tiny", quiet=True)
    pruner.apply(model, None, quiet=True)
    return model, source, windows, cache


def _kd_loss(model, windows, cache) -> float:
    idx = torch.arange(windows.shape[0])
    top = cache[idx].positions((slice(None), slice(None, -1)))
    with torch.no_grad():
        loss, _ = distillation_loss(logits(model, windows[:, :-1]), windows[:, 1:], top, 1.0, 1.0)
    return loss.item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masks_survive_kd_exactly(tiny_folder, tmp_path, pattern):
    model, _, windows, cache = _prune_with_teacher(tiny_folder, tmp_path, Magnitude(0.5, pattern))
    before = {id(lin): (lin.weight.detach().clone(), pruned_mask(lin).clone())
              for layer in model.layers for _, _, lin in projections(layer)}
    recover(model, windows, cache, RECOVERY, quiet=True)
    changed = 0
    for layer in model.layers:
        for _, _, lin in projections(layer):
            weight, keep = before[id(lin)]
            after = lin.weight.detach()
            assert torch.equal(after == 0, ~keep)  # the same zeros, no more and no fewer
            assert int((after == 0).sum()) == int(round(0.5 * after.numel()))
            if pattern == "2:4":
                assert follows_pattern(after, SparsityPattern.parse("2:4"))
            changed += int((after[keep] != weight[keep]).sum())
    assert changed > 0  # the survivors did train


def test_kd_loss_decreases_and_the_recovered_model_round_trips(tiny_folder, tmp_path):
    recipe = Recipe("magnitude-50", pruner=Magnitude(0.5))
    recovery = KDRecovery(steps=20, batch_size=2, seq_len=32, lr=3e-4, warmup_steps=2, dtype="fp32",
                          checkpoint_every=0)
    # 4 windows seen 10 times each: a random tiny model has nothing to generalise, so the loss is measured on them
    model, source, windows, cache = _prune_with_teacher(tiny_folder, tmp_path, recipe.pruner, recovery,
                                                        max_windows=4, peaked=True)
    loss_before = _kd_loss(model, windows, cache)
    result = recover(model, windows, cache, recovery, state_dir=str(tmp_path / "state"), quiet=True)
    loss_after = _kd_loss(model, windows, cache)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    assert result["tokens"] == windows.numel()
    ids = windows[0, :24]
    with torch.inference_mode():
        expected = model.lm_head(final_hidden_states(model, ids[None]))
    folder = save_checkpoint(model, source, str(tmp_path / "ckpt"), recipe, details={"kd_recovery": result})
    with open(os.path.join(folder, "config.json")) as f:
        sparsity = json.load(f)["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask"
    assert sparsity["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    served, _ = load_model(folder)
    with torch.inference_mode():
        torch.testing.assert_close(served.lm_head(final_hidden_states(served, ids[None])), expected,
                                   rtol=1e-4, atol=1e-4)


def test_prune_command_recovers_before_it_quantizes(tiny_folder, tmp_path, capsys, caplog):
    from pernode.cli import main

    out = str(tmp_path / "cli")
    args = ["prune", "--model", tiny_folder, "--method", "magnitude", "--pattern", "2:4", "--quantize", "rtn",
            "--bits", "8", "--recover-kd", "3", "--kd-batch-size", "2", "--kd-seq-len", "32", "--out", out]
    assert main(args) == 0
    assert "KD recovery: 3 steps" in capsys.readouterr().out
    served, _ = load_model(out)
    w = served.layers[1].mlp.down_proj.dequantized_weight()
    assert follows_pattern(w, SparsityPattern.parse("2:4")) and float((w == 0).float().mean()) >= 0.5
    assert main(args[:-2] + ["--recover-kd", "-1", "--out", out]) == 2
    assert "--recover-kd=-1: allowed >= 0" in caplog.text
