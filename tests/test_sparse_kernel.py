"""The bitmask GEMV (csrc/sparse_gemv.cpp) held to its plain-torch reference, ragged tails included; the bitmask
layout held to compressed-tensors'; the CUDA 2:4 path where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from pernode.serve.kernels.jit import load_extension
from pernode.serve.kernels.sparse_linear import (SOURCE, SemiStructuredLinear, SparseLinear,
                                                 sparse_gate, sparse_linear_reference)
from pernode.sparse_format import compress_bitmask, decompress, pack_bitmask, unpack_bitmask


def _sparse_weight(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return torch.where(torch.rand(n, k, generator=g) < sparsity, torch.zeros_like(w), w)


@pytest.fixture(scope="module")
def kernel():
    if not load_extension(SOURCE):
        pytest.skip("no C++ toolchain: the sparse kernel did not build")


@pytest.mark.parametrize("k", [576, 48, 37, 15, 1])  # multiples of 16 and ragged tails of the 16-column chunks
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 32])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_kernel_matches_reference(kernel, k, rows, sparsity):
    w = _sparse_weight(40, k, sparsity, seed=k + rows)
    bias = torch.randn(40)
    parts = compress_bitmask(w)
    x = torch.randn(rows, k)
    for threads in (1, 2):
        y = torch.ops.pernode.sparse_gemv(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], bias,
                                          threads)
        ref = sparse_linear_reference(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], k, bias)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # fp32 sums in another order


def test_sparse_linear_matches_dense_linear_on_both_paths(kernel):
    lin = torch.nn.Linear(96, 50)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight(50, 96, 0.7))
    sparse = SparseLinear.from_dense(lin)
    assert sparse.sparsity == pytest.approx(float((lin.weight == 0).float().mean()))
    with torch.no_grad():
        for rows in (1, 8, 64):  # the kernel up to the CPU's gate (4 or 8 rows), the expanded weight's GEMM above
            x = torch.randn(rows, 96)
            torch.testing.assert_close(sparse(x), lin(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sparse.dense_weight(), lin.weight)


def test_bitmask_layout_is_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_bitmask")
    w = _sparse_weight(7, 37, 0.6)
    ours = compress_bitmask(w)
    values, bitmask, offsets = ct.bitmask_compress(w)
    torch.testing.assert_close(ours["compressed"], values)
    assert torch.equal(ours["bitmask"], bitmask) and torch.equal(ours["row_offsets"], offsets)
    torch.testing.assert_close(ct.bitmask_decompress(ours["compressed"], ours["bitmask"], [7, 37]), w)
    torch.testing.assert_close(decompress(ours), w)
    mask = w != 0
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), 37), mask)


def test_decompress_names_what_is_inconsistent():
    parts = compress_bitmask(_sparse_weight(4, 16, 0.5))
    with pytest.raises(ValueError, match=r"lacks \['bitmask'\]"):
        decompress({k: v for k, v in parts.items() if k != "bitmask"})
    with pytest.raises(ValueError, match=r"values for"):
        decompress({**parts, "compressed": parts["compressed"][:-1]})
    with pytest.raises(ValueError, match=r"bitmask \(4, 1\): expected \(4, 2\)"):
        decompress({**parts, "bitmask": parts["bitmask"][:, :1]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparsity needs a CUDA GPU")
def test_semi_structured_2_4_on_cuda_matches_dense():
    from pernode.shrink.pruning.masks import keep_mask
    from pernode.sparse_format import SparsityPattern

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparse tensor cores need compute capability >= 8.0")
    w = torch.randn(256, 256)
    w = w * keep_mask(w.abs(), 0.5, SparsityPattern(2, 4))
    lin = torch.nn.Linear(256, 256, bias=False).cuda()
    with torch.no_grad():
        lin.weight.copy_(w.half().float())
    sparse = SemiStructuredLinear(lin)
    x = torch.randn(64, 256, device="cuda")
    torch.testing.assert_close(sparse(x), lin(x.half().float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("k", [576, 48, 37, 15, 1])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_bf16_kernel_matches_reference(kernel, k, rows, sparsity):
    """bf16 values and x: the kernel sums in fp32 and rounds once, so it sits within half a bf16 ulp of the fp32
    sum of the same bf16 inputs (tight), and within bf16 rounding of torch's bf16 F.linear (the reference)."""
    w = _sparse_weight(40, k, sparsity, seed=k + rows).bfloat16()
    bias = torch.randn(40).bfloat16()
    parts = compress_bitmask(w)
    assert parts["compressed"].dtype == torch.bfloat16
    x = torch.randn(rows, k).bfloat16()
    exact = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    ref = sparse_linear_reference(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], k, bias)
    for threads in (1, 2):
        y = torch.ops.pernode.sparse_gemv(x, parts["compressed"], parts["bitmask"], parts["row_offsets"], bias,
                                          threads)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 40)
        torch.testing.assert_close(y.float(), exact, rtol=2 ** -8, atol=1e-5)
        torch.testing.assert_close(y, ref, rtol=2 ** -7, atol=1e-2)


def test_kernel_refuses_mixed_dtypes(kernel):
    parts = compress_bitmask(_sparse_weight(8, 32, 0.5))
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        torch.ops.pernode.sparse_gemv(torch.randn(1, 32).bfloat16(), parts["compressed"], parts["bitmask"],
                                      parts["row_offsets"], None, 1)


def test_bf16_sparse_linear_runs_the_kernel_and_matches_dense(kernel, monkeypatch):
    lin = torch.nn.Linear(96, 50).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight(50, 96, 0.7).bfloat16())
    sparse = SparseLinear.from_dense(lin)
    assert sparse.values.dtype == torch.bfloat16
    if not sparse.max_kernel_rows:
        pytest.skip("the bitmask GEMV has no vector path on this CPU")
    calls = []
    real = torch.ops.pernode.sparse_gemv
    monkeypatch.setattr(torch.ops.pernode, "sparse_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        for rows in (1, sparse.max_kernel_rows, 64):  # the kernel up to the CPU's gate, the dense GEMM above
            x = torch.randn(rows, 96).bfloat16()
            torch.testing.assert_close(sparse(x), lin(x), rtol=2 ** -7, atol=2e-2)
    assert calls == [1, sparse.max_kernel_rows]


def test_bf16_model_is_served_through_the_sparse_kernel(kernel, tmp_path):
    """The bf16 default no longer falls back to dense: a bf16 model at 50% zeros gets bf16 SparseLinear layers."""
    from pernode.serve.kernels.sparse_linear import use_sparse_kernels
    from pernode.serve.models.loader import load_model
    from tiny_model import tiny_config, write_tiny_model

    folder = write_tiny_model(str(tmp_path / "tiny"), tiny_config(num_hidden_layers=1, hidden_size=64,
                                                                   intermediate_size=128))
    model, _ = load_model(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for lin in parent.children():
                    if isinstance(lin, torch.nn.Linear):
                        lin.weight[:, ::2] = 0
    assert use_sparse_kernels(model, min_sparsity=0.5) == 4  # AVX2's own gate starts higher: this is the dtype's test
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 4 and all(m.values.dtype == torch.bfloat16 for m in swapped)


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}, (0.5, 8)),  # vexpandps: wins from 50% zeros
    ({"avx2", "fma", "f16c"}, (0.7, 4)),  # table permutes: at 50% zeros no reliable gain over the dense GEMV
    ({"sse4_2"}, None),  # the scalar loop: never
])
def test_the_sparse_gate_follows_the_vector_unit(monkeypatch, flags, expected):
    from pernode.serve.kernels import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    gate = sparse_gate()
    assert (gate.min_sparsity, gate.max_rows) == expected if expected else gate is None
