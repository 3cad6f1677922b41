"""The weight-only GEMV serves up to 8 activation rows per pass over the weights: every row count from 1 to 17
(one, two and three passes, with ragged last passes) held to the plain-torch reference, and bf16 activations
returned as bf16 exactly as widening, the fp32 kernel and rounding would give."""
from __future__ import annotations

import pytest
import torch

from pernode.quant_format import QuantScheme, quantize_weight, unpack_int4
from pernode.serve.kernels.quant_linear import QuantLinear, load_kernel, woq_linear_reference

# 608 inputs: a partial last 128-value (int4) and 64-value (int8) chunk; 37 outputs: not a multiple of 16.
IN_FEATURES, OUT_FEATURES = 608, 37
SCHEMES = [QuantScheme(4, 32, symmetric=False, float_min=True),  # GGUF Q4_1, the default model's layers
           QuantScheme(4, 32), QuantScheme(8, 32), QuantScheme(8, None, symmetric=False)]


def _layer(scheme: QuantScheme) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(IN_FEATURES, OUT_FEATURES, scheme)
    w = torch.randn(OUT_FEATURES, IN_FEATURES)
    if scheme.float_min:  # Q4_1: unsigned levels 0..15 with a float min per group
        g = w.reshape(OUT_FEATURES, -1, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape_as(w).to(torch.int8) - 8
        layer.set_quantized(q, scale, lo)
    else:
        layer.set_quantized(*quantize_weight(w, scheme))
    return layer


def _reference(layer: QuantLinear, x: torch.Tensor, quantize_input: bool) -> torch.Tensor:
    return woq_linear_reference(x.float(), layer.qweight, layer.weight_scale, layer.weight_zero_point,
                                layer.scheme.num_bits, layer.scheme.group_size, quantize_input=quantize_input,
                                weight_min=layer.weight_min)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("quantize_input", [True, False], ids=["int8-x", "float-x"])
def test_every_row_count_up_to_17_matches_the_reference(scheme, quantize_input):
    op = load_kernel()
    if op is None:
        pytest.skip("C++ kernel unavailable: the reference is what runs")
    layer = _layer(scheme)
    x_all = torch.randn(17, IN_FEATURES) * torch.logspace(-1, 1, IN_FEATURES)
    for rows in range(1, 18):
        x = x_all[:rows]
        for threads in (1, 0):  # the caller's thread alone, and at::parallel_for over output rows
            args = (layer.qweight, layer._scale, layer._zero_term, scheme.num_bits, scheme.group_size or 0, threads)
            y = op(x, *args, quantize_input)
            ref = _reference(layer, x, quantize_input)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                       msg=lambda m: f"rows={rows} threads={threads}: {m}")
            if quantize_input or rows <= 8:  # the GEMV: rows sharing a pass do not change each other's sums
                assert torch.equal(y[-1:], op(x[-1:], *args, quantize_input)), (rows, threads)


@pytest.mark.parametrize("quantize_input", [True, False], ids=["int8-x", "float-x"])
def test_bf16_activations_come_back_as_bf16_rounded_from_the_fp32_result(quantize_input, monkeypatch):
    op = load_kernel()
    if op is None:
        pytest.skip("C++ kernel unavailable")
    layer = _layer(SCHEMES[0])
    args = (layer.qweight, layer._scale, layer._zero_term, 4, 32, 1, quantize_input)
    for rows in (1, 5, 8, 9, 17):  # GEMV passes, and (float x) the tiled GEMM from 9 rows
        x = torch.randn(rows, IN_FEATURES).bfloat16()
        y = op(x, *args)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, OUT_FEATURES)
        assert torch.equal(y, op(x.float(), *args).bfloat16()), rows
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "16")  # the layer's own dispatch, without measuring crossovers
    x = torch.randn(3, IN_FEATURES).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = _reference(layer, x, layer.gemv_quantizes_input(3, torch.bfloat16))
    assert ((y.float() - ref).norm() / ref.norm()).item() < 4e-3  # bf16 rounding of the outputs only

def test_non_2d_input_is_refused_with_the_field_named():
    op = load_kernel()
    if op is None:
        pytest.skip("C++ kernel unavailable")
    layer = _layer(SCHEMES[1])
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(torch.randn(2, 3, IN_FEATURES), layer.qweight, layer._scale, None, 4, 32, 1, True)


@pytest.mark.usefixtures("int8_x")
@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=lambda s: s.label())
def test_qparams_exact_in_fp16_stream_as_fp16_with_the_fp32_results(scheme):
    """GGUF's scales and mins are fp16: the int8-x GEMV reads them as stored (half the bytes), bit for bit the
    result of the fp32 copies; qparams fp16 cannot hold stay fp32."""
    op = load_kernel()
    if op is None:
        pytest.skip("C++ kernel unavailable: the reference is what runs")
    layer = _layer(scheme)
    assert layer._op_args[1].dtype == torch.float32  # random fp32 scales: not exact in fp16
    exact = _layer(scheme)
    exact.set_quantized(unpack_int4(exact.qweight, IN_FEATURES), exact.weight_scale.half().float(),
                        None if exact.weight_min is None else exact.weight_min.half().float())
    scale, term = exact._op_args[1:3]
    assert scale.dtype == torch.float16 and (term is None or term.dtype == torch.float16)
    x_all = torch.randn(11, IN_FEATURES)
    for rows in (1, 2, 5, 8, 11):
        x = x_all[:rows]
        for threads in (1, 0):  # 0: at::parallel_for, whose last chunk holds the table's last (ragged) row
            y16 = op(x, *exact._op_args[:5], threads, True)
            y32 = op(x, exact.qweight, exact._scale, exact._zero_term, scheme.num_bits, scheme.group_size or 0,
                     threads, True)
            assert torch.equal(y16, y32), (rows, threads)
        ref = _reference(exact, x, True)
        torch.testing.assert_close(y16, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_int8_weights_with_float_x_stay_within_int16_rounding_of_fp32():
    """On AVX2 the float-x GEMV of int8 weights (the Q8_0 lm_head) takes x as int16 per 32 values: its error stays
    far inside the int8-x path's, which flips the default model's near-tie first tokens; elsewhere it is fp32."""
    op = load_kernel()
    if op is None:
        pytest.skip("C++ kernel unavailable")
    layer = _layer(SCHEMES[2])  # int8, groups of 32: GGUF Q8_0
    x = torch.randn(5, IN_FEATURES) * torch.logspace(-2, 1, IN_FEATURES)
    ref = _reference(layer, x, False)
    args = (layer.qweight, layer._scale, layer._zero_term, 8, 32, 1)
    float_err = (op(x, *args, False) - ref).abs().max().item()
    int8_err = (op(x, *args, True) - ref).abs().max().item()
    assert float_err <= 1e-4 * ref.abs().max().item()  # the tolerance every kernel here is held to
    assert float_err * 20 < int8_err
