"""Sparse checkpoints: compressed-tensors' sparse-bitmask / sparse-24-bitmask written, re-loaded as the engine loads
them (same logits, the sparse kernel where it pays), read back by compressed-tensors itself, and served."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from pernode.quant_format import QuantScheme
from pernode.serve.kernels.attention_metadata import AttentionMetadata, contiguous_block_tables
from pernode.serve.kernels.sparse_linear import SparseLinear, sparse_gate
from pernode.serve.llm import LLM
from pernode.serve.models.loader import load_model
from pernode.serve.sampling.params import SamplingParams
from pernode.shrink.checkpoint import save_checkpoint
from pernode.shrink.evaluate.perplexity import calibration_windows, final_hidden_states
from pernode.shrink.methods import RTN
from pernode.shrink.pruning import Magnitude, SparseGPT, Wanda
from pernode.shrink.recipes import Recipe
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("sparse") / "tiny"), tiny_config())


@pytest.fixture(scope="module")
def calib(tiny_folder):
    return calibration_windows(load_model(tiny_folder)[1].tokenizer, 64, 2)


def _decode_logits(model, ids):
    """Logits of `ids` fed 4 tokens per forward through a KV cache: decode-sized rows (the sparse kernel's path)."""
    c = model.config
    table = contiguous_block_tables(1, ids.numel(), 16)
    shape = (table.numel(), 16, c.num_key_value_heads, c.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.num_hidden_layers)]
    out = []
    with torch.inference_mode():
        for start in range(0, ids.numel(), 4):
            n = min(4, ids.numel() - start)
            meta = AttentionMetadata.build(table, [start], [n], 16)
            out.append(model(ids[start:start + n], torch.arange(start, start + n), caches, meta))
    return torch.cat(out)


def _prune(tiny_folder, calib, recipe):
    model, source = load_model(tiny_folder)
    recipe.apply(model, calib, quiet=True)
    return model, source


@pytest.mark.parametrize("recipe,fmt", [
    (Recipe("sparsegpt-50", pruner=SparseGPT(0.5)), "sparse-bitmask"),
    (Recipe("wanda-2:4", pruner=Wanda(0.5, "2:4")), "sparse-24-bitmask"),
    (Recipe("magnitude-30", pruner=Magnitude(0.3)), "sparse-bitmask"),
])
def test_sparse_checkpoint_round_trips_to_the_same_logits(tiny_folder, calib, tmp_path, caplog, recipe, fmt):
    model, source = _prune(tiny_folder, calib, recipe)
    ids = calib[0, :24]
    with torch.inference_mode():
        expected = model.lm_head(final_hidden_states(model, ids[None]))
    folder = save_checkpoint(model, source, str(tmp_path / recipe.name), recipe)
    with open(os.path.join(folder, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["sparsity_config"]["format"] == fmt
    assert qc["sparsity_config"]["sparsity_structure"] == recipe.pruner.sparsity_pattern.label()
    assert qc["sparsity_config"]["global_sparsity"] == pytest.approx(recipe.pruner.sparsity, abs=0.01)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.down_proj.bitmask" in names and "model.layers.0.mlp.down_proj.weight" not in names
    with caplog.at_level(logging.INFO, logger="pernode.serve"):
        served, _ = load_model(folder)
    kernels = [m for m in served.modules() if isinstance(m, SparseLinear)]
    gate = sparse_gate()
    if gate is not None and recipe.pruner.sparsity >= gate.min_sparsity:
        assert len(kernels) == 4 * served.config.num_hidden_layers or "no sparse kernel" in caplog.text
    elif gate is not None:
        assert not kernels and "no speedup at this sparsity" in caplog.text
    else:
        assert not kernels and "no sparse kernel" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(served.lm_head(final_hidden_states(served, ids[None])), expected,
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_decode_logits(served, ids), expected, rtol=1e-3, atol=1e-3)


def test_compressed_tensors_reads_our_sparse_checkpoints(tiny_folder, calib, tmp_path):
    ct = pytest.importorskip("compressed_tensors.compressors")
    for recipe in (Recipe("u", pruner=SparseGPT(0.5)), Recipe("s24", pruner=SparseGPT(0.5, "2:4"))):
        model, source = _prune(tiny_folder, calib, recipe)
        folder = save_checkpoint(model, source, str(tmp_path / recipe.name), recipe)
        with open(os.path.join(folder, "config.json")) as f:
            compressor = ct.ModelCompressor.from_compression_config(json.load(f)["quantization_config"])
        assert compressor.quantization_config is None  # sparse only: no quantization scheme for it to apply
        dense = dict(compressor.sparsity_compressor.decompress(folder))
        expected = model.hf_state_dict()
        for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
            torch.testing.assert_close(dense[name], expected[name])


def test_pruned_and_quantized_checkpoint_is_served_with_its_zeros(tiny_folder, calib, tmp_path, caplog):
    recipe = Recipe("sparse-int8", QuantScheme(8), RTN(), pruner=Magnitude(0.5, "2:4"))
    model, source = _prune(tiny_folder, calib, recipe)
    folder = save_checkpoint(model, source, str(tmp_path / "q"), recipe)
    with open(os.path.join(folder, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["sparsity_config"]["format"] == "dense"
    with caplog.at_level(logging.WARNING, logger="pernode.serve"):
        served, _ = load_model(folder)
    assert "no sparse kernel for quantized weights" in caplog.text
    w = served.layers[0].mlp.down_proj.dequantized_weight()
    assert (w != 0).reshape(w.shape[0], -1, 4).sum(-1).max() <= 2


def test_engine_serves_a_sparse_checkpoint_like_the_pruned_model(tiny_folder, calib, tmp_path):
    recipe = Recipe("sparsegpt-60", pruner=SparseGPT(0.6))
    model, source = _prune(tiny_folder, calib, recipe)
    folder = save_checkpoint(model, source, str(tmp_path / "served"), recipe)
    ids = calib[1, :12].tolist()
    with torch.inference_mode():
        greedy = []
        seq = list(ids)
        for _ in range(6):
            logits = model.lm_head(final_hidden_states(model, torch.tensor(seq)[None]))[-1]
            seq.append(int(logits.argmax()))
            greedy.append(seq[-1])
    llm = LLM(folder, num_blocks=64, max_model_len=256)
    out = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == greedy


def test_prune_command_writes_a_checkpoint_and_says_where_sparsity_does_not_pay(tiny_folder, tmp_path, capsys,
                                                                              caplog):
    from pernode.cli import main

    out = str(tmp_path / "cli")
    assert main(["prune", "--model", tiny_folder, "--method", "magnitude", "--sparsity", "0.3", "--out", out]) == 0
    printed = capsys.readouterr().out
    gate = sparse_gate()
    assert (f"no speedup at this sparsity (30% < {gate.min_sparsity:.0%}" if gate else "served: dense here") in printed
    assert load_model(out)[0].layers[1].mlp.down_proj.weight.eq(0).float().mean().item() == pytest.approx(0.3, abs=1e-3)
    assert main(["prune", "--model", tiny_folder, "--method", "wanda", "--damp", "0.1", "--out", out]) == 2
    assert "--damp applies to --method sparsegpt only" in caplog.text
    assert main(["prune", "--model", tiny_folder, "--method", "magnitude", "--sparsity", "0.3", "--pattern", "2:4",
                 "--out", out]) == 2
    assert "--sparsity 0.3: allowed 0.5 with pattern 2:4" in caplog.text
