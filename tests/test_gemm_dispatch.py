"""The compute-bound path of quantized linears (woq_gemm: dequantized tiles through a GEMM in x's dtype) held to
the plain-torch reference over ragged shapes, and the GEMV/GEMM choice: crossovers from measured lines, cached per
shape, overridable, and honoured by QuantLinear.forward."""
from __future__ import annotations

import json

import pytest
import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.serve.kernels import gemm_dispatch
from pernode.serve.kernels.gemm_dispatch import (MIN_ROWS, NEVER, LinearShape, crossover_of_lines, gemm_from_rows)
from pernode.serve.kernels.quant_linear import QuantLinear, load_kernel, woq_linear_reference

SCHEMES = [QuantScheme(4, 32), QuantScheme(4, 32, symmetric=False, float_min=True), QuantScheme(8, 32),
           QuantScheme(4, 64, symmetric=False), QuantScheme(8, None), QuantScheme(4, None)]


def _layer(scheme: QuantScheme, in_features: int, out_features: int, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear(in_features, out_features, scheme)
    plain = QuantScheme(scheme.num_bits, scheme.group_size, scheme.symmetric)
    q, scale, zero = quantize_weight(torch.randn(out_features, in_features), plain)
    if scheme.float_min:
        zero = torch.randn(out_features, in_features // scheme.group_size) * 0.1
    layer.set_quantized(q, scale, zero)
    return layer


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return woq_linear_reference(x.float(), layer.qweight, layer.weight_scale, layer.weight_zero_point,
                                layer.scheme.num_bits, layer.scheme.group_size, weight_min=layer.weight_min)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("in_features, out_features", [(576, 80), (96, 37), (1536, 23)])
def test_gemm_matches_reference_with_ragged_tails(scheme, in_features, out_features):
    """Ragged: output rows not a multiple of the 16-row tile step, groups not a multiple of the 64-value vector
    step (96 = 3 groups of 32), row counts off every block size."""
    if scheme.group_size and in_features % scheme.group_size:
        pytest.skip("group does not divide")
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable: the reference is what runs")
    layer = _layer(scheme, in_features, out_features)
    for m in (1, 5, 17, 33):
        x = torch.randn(m, in_features)
        ref = _reference(layer, x)
        y32 = torch.ops.pernode.woq_gemm(x, *layer._op_args[:5])
        torch.testing.assert_close(y32, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        y16 = torch.ops.pernode.woq_gemm(x.bfloat16(), *layer._op_args[:5])
        assert y16.dtype == torch.bfloat16
        # bf16 rounds x and the dequantized weights (8 bits of mantissa): ~2^-8 relative per product
        assert ((y16.float() - _reference(layer, x.bfloat16())).norm() / ref.norm()).item() < 1e-2


def test_gemm_rejects_bad_operands():
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    layer = _layer(QuantScheme(4, 32), 64, 16)
    with pytest.raises(RuntimeError, match="woq_gemm"):
        torch.ops.pernode.woq_gemm(torch.randn(2, 32), *layer._op_args[:5])
    with pytest.raises(RuntimeError, match="woq_gemm"):
        torch.ops.pernode.woq_gemm(torch.randn(2, 64).half(), *layer._op_args[:5])


def test_crossover_of_lines():
    rows = (8, 64)
    # GEMV 1 ms per 4 rows from 0; GEMM 4.9 ms fixed + 0.05 ms per row: meet at 4.9 / (0.25 - 0.05) = 24.5 rows
    assert crossover_of_lines(rows, (2e-3, 16e-3), (5.3e-3, 8.1e-3)) == 25
    assert crossover_of_lines(rows, (2e-3, 16e-3), (1e-3, 2e-3)) == MIN_ROWS  # GEMM below everywhere: floor
    assert crossover_of_lines(rows, (2e-3, 16e-3), (30e-3, 50e-3)) == NEVER  # GEMM grows faster: never


def test_crossover_is_measured_once_and_cached_per_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("PERNODE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("PERNODE_GEMM_FROM_ROWS", raising=False)
    gemm_dispatch.forget_measurements()
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return x

    shape = LinearShape(64, 32, 4, 32, True, True, torch.float32, 1)
    first = gemm_from_rows(shape, "quant_linear.cpp", counted, counted)
    assert calls and MIN_ROWS <= first <= NEVER
    entries = json.loads((tmp_path / gemm_dispatch.CACHE_FILE).read_text())
    assert list(entries.values()) == [first] and "N=64|K=32|w4g32" in next(iter(entries))
    calls.clear()
    gemm_dispatch.forget_measurements()  # a new process: the file answers
    assert gemm_from_rows(shape, "quant_linear.cpp", counted, counted) == first and not calls
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "7")
    assert gemm_from_rows(shape, "quant_linear.cpp", counted, counted) == 7
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "0")
    with pytest.raises(ValueError, match="PERNODE_GEMM_FROM_ROWS"):
        gemm_from_rows(shape, "quant_linear.cpp", counted, counted)
    gemm_dispatch.forget_measurements()


def test_forward_runs_the_gemv_below_and_the_gemm_from_the_crossover(monkeypatch):
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "6")
    layer = _layer(QuantScheme(4, 32, symmetric=False, float_min=True), 128, 48)
    assert layer.gemm_from_rows(torch.float32) == 6
    below, above = torch.randn(5, 128), torch.randn(6, 128)
    assert layer.gemv_quantizes_input(5) and not layer.gemv_quantizes_input(6)
    torch.testing.assert_close(layer(below), torch.ops.pernode.woq_linear(below, *layer._op_args, True))
    torch.testing.assert_close(layer(above), torch.ops.pernode.woq_gemm(above, *layer._op_args[:5]))
    y = layer(above.bfloat16())
    assert y.dtype == torch.bfloat16
    assert ((y.float() - _reference(layer, above)).norm() / _reference(layer, above).norm()).item() < 1e-2


def test_model_dtype_keeps_qparams_fp32():
    """model.to(bfloat16) must not round the scales and mins: GGUF's fp16 values would lose 3 bits each."""
    layer = _layer(QuantScheme(4, 32, symmetric=False, float_min=True), 64, 16)
    scale = layer.weight_scale.clone() + 1e-3 * torch.rand_like(layer.weight_scale)  # bits bf16 cannot hold
    layer.weight_scale.copy_(scale)
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.weight_min.dtype == torch.float32
