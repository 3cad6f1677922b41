"""The fused decoder ops (residual add + RMSNorm, SwiGLU's silu-and-mul) held to their plain-torch references,
and the vectorised step layout held to the rule it replaced (one sequence at a time)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pernode.serve.kernels import layer_ops
from pernode.serve.kernels.attention_metadata import AttentionMetadata, token_positions
from pernode.serve.kernels.jit import load_extension

needs_kernels = pytest.mark.skipif(not load_extension(layer_ops.SOURCE), reason="C++ layer ops unavailable")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 37), (65, 64), (130, 576)])  # ragged widths, both paths
def test_add_rms_norm_matches_reference(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.rand(hidden, generator=g).to(dtype)
    x_before = x.clone()
    total, normed = torch.ops.pernode.add_rms_norm(x, residual, w, 1e-5)
    ref_total, ref_normed = layer_ops.add_rms_norm_reference(x, residual, w, 1e-5)
    assert total.dtype == normed.dtype == dtype
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)  # one rounding, the same one
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed.float(), ref_normed.float(), rtol=tol, atol=tol)
    assert torch.equal(x, x_before)  # inputs untouched


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 13), (17, 96), (64, 1536)])
def test_silu_and_mul_matches_reference(dtype, rows, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    out = torch.ops.pernode.silu_and_mul(gate_up)
    ref = layer_ops.silu_and_mul_reference(gate_up)
    assert out.shape == (rows, inter) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@needs_kernels
def test_dispatchers_take_the_kernel_and_the_reference_by_choice():
    x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.rand(32)
    fused = layer_ops.add_rms_norm(x, r, w, 1e-6, native=True)
    plain = layer_ops.add_rms_norm(x, r, w, 1e-6, native=False)
    torch.testing.assert_close(fused, plain)
    gu = torch.randn(3, 20)
    torch.testing.assert_close(layer_ops.silu_and_mul(gu, native=True), layer_ops.silu_and_mul(gu, native=False))
    with pytest.raises(RuntimeError, match="shapes differ"):
        torch.ops.pernode.add_rms_norm(x, r[:2], w, 1e-6)


def test_step_layout_matches_the_per_sequence_rule():
    block_size = 4
    tables = np.array([[7, 2, 0], [5, 0, 0], [1, 3, 9]])
    num_cached, query_lens = [5, 0, 9], [1, 3, 2]  # a decode, a fresh prompt, a chunk crossing a block edge
    meta = AttentionMetadata.build(tables, num_cached, query_lens, block_size)
    expected_slots, expected_pos = [], []
    for s, (start, n) in enumerate(zip(num_cached, query_lens)):
        for p in range(start, start + n):
            expected_pos.append(p)
            expected_slots.append(tables[s, p // block_size] * block_size + p % block_size)
    assert meta.slot_mapping.tolist() == expected_slots == [2 * 4 + 1, 20, 21, 22, 9 * 4 + 1, 9 * 4 + 2]
    assert token_positions(num_cached, query_lens).tolist() == expected_pos
    assert meta.query_start_loc.tolist() == meta.query_start_loc_cpu == [0, 1, 4, 6]
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == [6, 3, 11]
    assert (meta.max_query_len, meta.max_seq_len) == (3, 11)
    assert meta.slot_mapping.dtype == torch.int64 and meta.query_start_loc.dtype == torch.int32
