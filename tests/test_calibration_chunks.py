"""Layer-by-layer calibration in chunks of windows: the same layer outputs and Hessians as one forward over all
windows (ragged last chunk included), the Hessian forward stopping early without changing them, each layer
calibrating on the outputs of the already-pruned layers before it, and GPTQ's staged install."""
from __future__ import annotations

import pytest
import torch

from pernode.quant_format import QuantScheme
from pernode.serve.kernels.quant_linear import QuantLinear
from pernode.serve.models.loader import load_model
from pernode.shrink.calibration import ChunkedForward, run_sequential
from pernode.shrink.evaluate.perplexity import Forward, calibration_windows
from pernode.shrink.methods import GPTQ
from pernode.shrink.methods.common import projections
from pernode.shrink.methods.gptq import layer_hessians
from tiny_model import tiny_config, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_model(str(tmp_path_factory.mktemp("chunks") / "tiny"),
                              tiny_config(num_hidden_layers=2, hidden_size=64, intermediate_size=128))
    model, source = load_model(folder)
    return folder, calibration_windows(source.tokenizer, 32, 5)


@torch.no_grad()
def test_chunked_forward_and_hessians_match_one_forward(tiny):
    folder, windows = tiny
    model, _ = load_model(folder)
    x = model.embed_tokens(windows.flatten())
    whole = Forward.build(model, *windows.shape)
    chunked = ChunkedForward(model, *windows.shape, chunk_windows=2)  # 2 + 2 + 1 windows
    assert [p[1] for p in chunked.parts(x)] == [slice(0, 64), slice(64, 128), slice(128, 160)]
    layer = model.layers[0]
    torch.testing.assert_close(chunked.layer(layer, x), whole.layer(layer, x), rtol=1e-5, atol=1e-5)
    full = layer_hessians(layer, x, whole, stop_early=False)
    for fwd in (whole, chunked):
        for diagonal in (False, True):
            got = layer_hessians(layer, x, fwd, diagonal_only=diagonal)
            assert set(got) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
            for attr, h in full.items():
                torch.testing.assert_close(got[attr], torch.diagonal(h) if diagonal else h, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_windows=0"):
        ChunkedForward(model, 5, 32, 0)


@torch.no_grad()
def test_each_layer_calibrates_on_the_outputs_of_the_pruned_layers_before_it(tiny):
    folder, windows = tiny
    model, _ = load_model(folder)
    seen = {}

    def prune_half(i, layer, x, fwd):
        seen[i] = x.clone()
        for _, _, lin in projections(layer):
            lin.weight[:, ::2] = 0.0

    run_sequential(model, windows, prune_half, quiet=True, chunk_windows=2)
    fwd = Forward.build(model, *windows.shape)
    pruned_out = fwd.layer(model.layers[0], model.embed_tokens(windows.flatten()))
    dense, _ = load_model(folder)
    dense_out = fwd.layer(dense.layers[0], dense.embed_tokens(windows.flatten()))
    torch.testing.assert_close(seen[1], pruned_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[1], dense_out, rtol=1e-3, atol=1e-3)


def test_gptq_installs_every_layer_after_calibrating_on_dequantized_weights(tiny):
    folder, windows = tiny
    model, _ = load_model(folder)
    GPTQ().apply(model, QuantScheme(4, 32), windows, quiet=True)
    installed = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                       layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(isinstance(m, QuantLinear) for m in installed) and len(installed) == 8


def test_held_out_calibration_text_skips_exactly_the_scored_windows(tiny):
    from pernode.shrink.evaluate.perplexity import corpus_text, split_corpus
    from pernode.shrink.pruning.calibration_text import held_out_windows

    folder, _ = tiny
    tok = load_model(folder)[1].tokenizer
    head = calibration_windows(tok, 64)
    windows = held_out_windows(tok, 64, len(head) + 3, eval_seq_len=128, eval_windows=4)
    assert windows.shape == (len(head) + 3, 64)
    assert torch.equal(windows[:len(head)], head)
    evaluated = tok.encode(split_corpus(corpus_text())[1], add_special_tokens=False)
    assert windows[len(head):].flatten().tolist() == evaluated[4 * 128: 4 * 128 + 3 * 64]  # right after the scored
    assert torch.equal(held_out_windows(tok, 64, 2, 128, 4), head[:2])
    with pytest.raises(ValueError, match="eval_windows=0"):
        held_out_windows(tok, 64, 2, 128, 0)


@pytest.mark.parametrize("k", [1, 3, 64, 97])
def test_hessian_by_block_upper_triangle_is_x_transpose_x(k):
    from pernode.shrink.methods.gptq import add_gram_upper_, mirror_block_upper_

    g = torch.Generator().manual_seed(k)
    parts = [torch.randn(n, k, generator=g) for n in (5, 17)]
    h = torch.zeros(k, k)
    for x in parts:
        add_gram_upper_(h, x, 2.0)
    mirror_block_upper_(h)
    x = torch.cat(parts)
    torch.testing.assert_close(h, 2.0 * x.t() @ x, rtol=1e-5, atol=1e-5)
