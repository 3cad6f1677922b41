"""The int16-x GEMMs (`woq_gemm_int16x`: int4 weights on AVX2, csrc/gemm_int4_int16x_avx2.h; int8 weights on
AVX-512 VNNI, csrc/gemm_int8_int16x_avx512.h) held to a plain-torch model of their arithmetic and to the fp32
reference, over ragged shapes, every qparam form, fp32/fp16 qparams and fp32/bf16 x; each row's result independent of
the rows beside it and of the thread count; and the layer's choice of them."""
from __future__ import annotations

import pytest
import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.serve.kernels.cpu_features import multiplies_int16_gemm
from pernode.serve.kernels.quant_linear import (QuantLinear, int16_gemm_applies, load_kernel, unpacked_weight,
                                                woq_linear_reference)

from int4_layers import SCHEMES, int4_layer

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="C++ kernel unavailable")
on_avx2 = pytest.mark.skipif(not multiplies_int16_gemm(), reason="the int4 int16-x GEMM is for AVX2 without AVX-512")
on_vnni = pytest.mark.skipif(not multiplies_int16_gemm(8), reason="the int8 int16-x GEMM is built for AVX-512 VNNI")
INT8_SCHEMES = {"q8_0": QuantScheme(8, 32), "zp-g64": QuantScheme(8, 64, symmetric=False),
                "per-channel": QuantScheme(8, None)}

_layer = int4_layer


def _gemm(layer: QuantLinear, x: torch.Tensor, threads: int = 0, half_qparams: bool = False) -> torch.Tensor:
    scale, term = layer._scale, layer._zero_term
    if half_qparams:
        scale, term = scale.half(), None if term is None else term.half()
    return torch.ops.pernode.woq_gemm_int16x(x, layer.qweight, scale, term, layer.scheme.group_size or 0, threads)


def _int16_model(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in plain torch: x rounded to int16 per 32 values times scale * u (u: the stored
    integer), plus the zero term times each block's float sum of x."""
    k = layer.in_features
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax)))
    xq = (q * (amax / 32767.0)).reshape(x.shape[0], k).double()
    int4 = layer.scheme.num_bits == 4
    u = unpacked_weight(layer.qweight, 4, k).double() + 8.0 if int4 else layer.qweight.double()  # as stored
    gs = layer.scheme.group_size or k
    scale = layer._scale.double().repeat_interleave(gs, dim=1)
    term = (layer._zero_term.double() if layer._zero_term is not None
            else (-8.0 if int4 else 0.0) * layer._scale.double())
    term = term.repeat_interleave(gs, dim=1)
    return (xq @ (scale * u).T + x.double() @ term.T).float()


@on_avx2
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("rows,in_features,out_features", [(37, 640, 100), (5, 256, 17), (70, 1536, 24),
                                                          (1, 128, 8), (130, 384, 41)])
def test_matches_its_plain_torch_model_and_the_fp32_reference(scheme, rows, in_features, out_features):
    layer = _layer(SCHEMES[scheme], in_features, out_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[:, :32] *= 40.0  # an outlier block: its scale must not leak into the others
    y = _gemm(layer, x)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    model = _int16_model(layer, x)
    assert (y - model).abs().max().item() <= 2e-6 * model.abs().max().item() + 1e-6
    fp32 = woq_linear_reference(x, layer.qweight, layer.weight_scale, layer.weight_zero_point, 4,
                                layer.scheme.group_size, weight_min=layer.weight_min)
    err = (y - fp32).abs().max().item() / fp32.abs().max().item()
    assert err < 1e-4, err  # int16 x: ~1e-5 of a block's largest |x| (int8 x errs ~4e-3)


@on_avx2
def test_fp16_qparams_and_bf16_x():
    layer = _layer(SCHEMES["q4_1"], 256, 40)
    x = torch.randn(9, 256)
    assert torch.equal(_gemm(layer, x, half_qparams=True), _gemm(layer, x))  # GGUF's qparams are exact in fp16
    y16 = _gemm(layer, x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), _gemm(layer, x.bfloat16().float()).bfloat16().float())


@on_avx2
def test_each_rows_result_does_not_depend_on_the_rows_beside_it_or_the_threads():
    layer = _layer(SCHEMES["q4_1"], 576, 56)
    x = torch.randn(71, 576, generator=torch.Generator().manual_seed(3))  # past one 64-row chunk, ragged MR tail
    whole = _gemm(layer, x, threads=2)
    assert torch.equal(whole, _gemm(layer, x, threads=1))
    for m in (0, 3, 63, 64, 70):
        assert torch.equal(_gemm(layer, x[m:m + 1]), whole[m:m + 1])
    assert torch.equal(_gemm(layer, x[5:12]), whole[5:12])


def _int8_layer(scheme: QuantScheme, in_features: int, out_features: int) -> QuantLinear:
    layer = QuantLinear(in_features, out_features, scheme)
    layer.set_quantized(*quantize_weight(torch.randn(out_features, in_features,
                                                     generator=torch.Generator().manual_seed(out_features)), scheme))
    return layer


@on_vnni
@pytest.mark.parametrize("scheme", list(INT8_SCHEMES))
@pytest.mark.parametrize("rows,in_features,out_features", [(37, 640, 100), (5, 256, 17), (70, 1536, 24),
                                                          (1, 128, 8), (13, 576, 49)])
def test_int8_weights_match_their_plain_torch_model_and_the_fp32_reference(scheme, rows, in_features, out_features):
    """out_features off a 32-column panel and off a 16-column strip: the masked stores and zero-padded strips."""
    layer = _int8_layer(INT8_SCHEMES[scheme], in_features, out_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[:, :32] *= 40.0
    y = _gemm(layer, x)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    model = _int16_model(layer, x)
    assert (y - model).abs().max().item() <= 2e-6 * model.abs().max().item() + 1e-6
    fp32 = woq_linear_reference(x, layer.qweight, layer.weight_scale, layer.weight_zero_point, 8,
                                layer.scheme.group_size)
    assert (y - fp32).abs().max().item() < 1e-4 * fp32.abs().max().item()


@on_vnni
def test_int8_weights_rows_do_not_depend_on_the_rows_beside_them_or_the_threads():
    layer = _int8_layer(INT8_SCHEMES["q8_0"], 576, 200)
    x = torch.randn(29, 576, generator=torch.Generator().manual_seed(5))  # 4 blocks of 6 rows and a tail of 5
    whole = _gemm(layer, x, threads=2)
    assert torch.equal(whole, _gemm(layer, x, threads=1))
    for lo, hi in ((0, 1), (6, 7), (3, 11), (24, 29)):
        assert torch.equal(_gemm(layer, x[lo:hi]), whole[lo:hi])
    y16 = _gemm(layer, x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), _gemm(layer, x.bfloat16().float()).bfloat16().float())


def test_bad_shapes_are_refused_with_the_field():
    layer = _layer(SCHEMES["q4_1"], 128, 16)
    with pytest.raises(RuntimeError, match="weight shape"):
        torch.ops.pernode.woq_gemm_int16x(torch.randn(3, 256), layer.qweight, layer._scale, layer._zero_term, 32)
    if multiplies_int16_gemm():
        with pytest.raises(RuntimeError, match="float32 or bfloat16"):
            torch.ops.pernode.woq_gemm_int16x(torch.randn(3, 128).half(), layer.qweight, layer._scale,
                                              layer._zero_term, 32)


def test_the_layer_takes_it_where_it_applies_and_float_turns_it_off(monkeypatch):
    monkeypatch.delenv("PERNODE_GEMM_INPUT", raising=False)
    layer = _layer(SCHEMES["q4_1"], 256, 32)
    assert layer.gemm_takes_int16 == multiplies_int16_gemm()
    assert int16_gemm_applies(8, 256, 32) == multiplies_int16_gemm(8)  # int8 weights: AVX-512 VNNI
    assert not int16_gemm_applies(4, 80, None) and not int16_gemm_applies(8, 80, None)  # the blocks do not fit
    x = torch.randn(40, 256)
    if layer.gemm_takes_int16:
        assert torch.equal(layer._run_gemm(x), _gemm(layer, x))
    lm_head_like = _int8_layer(INT8_SCHEMES["q8_0"], 256, 48)  # the Q8_0 lm_head's format
    assert lm_head_like.gemm_takes_int16 == multiplies_int16_gemm(8)
    if lm_head_like.gemm_takes_int16:
        assert torch.equal(lm_head_like._run_gemm(x), _gemm(lm_head_like, x))
    monkeypatch.setenv("PERNODE_GEMM_INPUT", "float")
    layer.post_load()
    assert not layer.gemm_takes_int16
    assert torch.equal(layer._run_gemm(x), torch.ops.pernode.woq_gemm(x, layer.qweight, layer._scale,
                                                                        layer._zero_term, 4, 32))
    monkeypatch.setenv("PERNODE_GEMM_INPUT", "int4")
    with pytest.raises(ValueError, match="PERNODE_GEMM_INPUT"):
        layer.post_load()
