"""Quantized linear kernels held to their plain-torch references, and the int4 packing held to compressed-tensors'."""
from __future__ import annotations

import pytest
import torch

from pernode.quant_format import QuantScheme, dequantize, pack_int4, quantize_weight, unpack_int4
from pernode.serve.kernels.gemm_dispatch import NEVER
from pernode.serve.kernels.quant_linear import (FLOAT_GEMV_MAX_ROWS, QuantLinear, load_kernel, quantize_input_blocks,
                                                woq_linear_reference)
from pernode.serve.kernels.w8a8_linear import W8A8Linear, w8a8_linear_reference



pytestmark = pytest.mark.usefixtures("int8_x")  # the int8-x GEMV held to its reference on every CPU

def _random_layer(scheme: QuantScheme, in_features: int, out_features: int) -> QuantLinear:
    """A QuantLinear holding RTN-quantized random weights."""
    layer = QuantLinear(in_features, out_features, scheme)
    layer.set_quantized(*quantize_weight(torch.randn(out_features, in_features), scheme))
    return layer

def test_int4_packing_is_compressed_tensors_layout():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7] * 2], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    word = packed[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [v + 8 for v in q[0, :8].tolist()]
    assert torch.equal(unpack_int4(packed, 16), q)
    r = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(r), 64), r)


def test_quantize_dequantize_error_is_bounded_by_half_a_step():
    w = torch.randn(8, 128)
    for scheme in (QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64, symmetric=False)):
        q, s, z = quantize_weight(w, scheme)
        err = (dequantize(q, s, z, scheme.group_size) - w).abs()
        step = s.repeat_interleave(scheme.group_size or 128, dim=1)
        assert (err <= step * 0.5 + 1e-6).all(), scheme


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, 64, False), (4, 64, True),
                                                        (4, 32, False), (4, None, True), (4, 128, False)])
@pytest.mark.parametrize("in_features", [576, 1536])
def test_weight_only_kernel_matches_reference(bits, group_size, symmetric, in_features):
    if group_size and in_features % group_size:
        pytest.skip("group does not divide")
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable: the reference is what runs")
    torch.manual_seed(0)
    layer = _random_layer(QuantScheme(bits, group_size, symmetric), in_features, 80)
    for m in (1, 2, 3, 5, 8, 9, 33, 300):  # GEMV row chunks of 1..4, then dequantized tiles + GEMM (measured)
        x = torch.randn(m, in_features)
        int8_x = layer.gemv_quantizes_input(m)  # int4 decode GEMV quantizes x per 32 values (VNNI)
        ref = woq_linear_reference(x, layer.qweight, layer.weight_scale, layer.weight_zero_point, bits, group_size,
                                   quantize_input=int8_x)
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_int8_input_quantization_is_per_32_block_and_close_to_float(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 128) * torch.logspace(-2, 2, 128)  # blocks of very different scales
    xq = quantize_input_blocks(x)
    err = (xq - x).abs().reshape(3, 4, 32)
    step = x.abs().reshape(3, 4, 32).amax(-1, keepdim=True) / 127
    assert (err <= step / 2 + 1e-7).all()  # half a step of the block's own scale, not the row's
    assert torch.equal(quantize_input_blocks(torch.zeros(1, 32)), torch.zeros(1, 32))
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    layer = _random_layer(QuantScheme(4, 64), 576, 300)
    x = torch.randn(2, 576)
    exact = woq_linear_reference(x, layer.qweight, layer.weight_scale, None, 4, 64)
    y = layer(x)
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 0 < rel < 1e-2  # quantized x: close to, but not, the float result
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "float")
    layer.post_load()
    torch.testing.assert_close(layer(x), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


def test_weight_only_kernel_single_thread_matches(monkeypatch):
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    monkeypatch.setenv("PERNODE_QUANT_THREADS", "1")
    layer = _random_layer(QuantScheme(4, 64), 576, 200)
    x = torch.randn(1, 576)
    ref = woq_linear_reference(x, layer.qweight, layer.weight_scale, None, 4, 64, quantize_input=True)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("threshold", [None, 2.0])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_w8a8_matches_reference(threshold, m):
    torch.manual_seed(0)
    scheme = QuantScheme(8, activations="int8-token", outlier_threshold=threshold)
    layer = W8A8Linear(96, 48, scheme)
    layer.set_quantized(*quantize_weight(torch.randn(48, 96), QuantScheme(8))[:2])
    x = torch.randn(m, 96)
    ref = w8a8_linear_reference(x, layer.weight, layer.weight_scale, threshold)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    if threshold is not None:
        assert layer.num_outlier_columns == int((x.abs() >= threshold).any(0).sum())


@pytest.mark.parametrize("bits,group_size,symmetric,k", [(8, None, True, 608), (8, 32, False, 608),
                                                          (4, 32, True, 608), (4, 128, False, 640)])
def test_int8_input_gemv_matches_reference_for_every_weight_format(bits, group_size, symmetric, k):
    """The VNNI path also serves int8 weights (unsigned via XOR 0x80, the +128 undone per lane): held to the
    reference directly, since layers pick it only for int4."""
    op = load_kernel()
    if op is None:
        pytest.skip("C++ kernel unavailable")
    torch.manual_seed(1)
    # 608: a partial last chunk in both the int4 (128) and int8 (64) layouts
    layer = _random_layer(QuantScheme(bits, group_size, symmetric), k, 72)
    for m in (1, 4, 7):
        x = torch.randn(m, k)
        y = op(x, layer.qweight, layer._scale, layer._zero_term, bits, group_size or 0, 1, True)
        ref = woq_linear_reference(x, layer.qweight, layer.weight_scale, layer.weight_zero_point, bits, group_size,
                                   quantize_input=True)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_batch_path_under_inference_mode_with_worker_threads():
    """Tiles are written by at::parallel_for's workers: they must run in the caller's inference mode."""
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    layer = _random_layer(QuantScheme(4, 64), 576, 1000)
    x = torch.randn(64, 576)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = layer(x)
    finally:
        torch.set_num_threads(threads)
    ref = woq_linear_reference(x, layer.qweight, layer.weight_scale, None, 4, 64,
                               quantize_input=layer.gemv_quantizes_input(64))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, symmetric=False), QuantScheme(8, 32)], ids=["w4g32", "w8g32"])
def test_gemv_row_does_not_depend_on_the_rows_beside_it(monkeypatch, scheme, dtype):
    # Exact speculative verification relies on it: a verify step's k + 1 rows go through the GEMV together, and
    # each must come out bit for bit as the one-row decode call would.
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "1000")  # no measured GEMM crossover in the way
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "off")  # the GEMV alone (the panel's rows: test_int4_panel_gemm)
    layer = _random_layer(scheme, 576, 200)
    x = torch.randn(13, 576, generator=torch.Generator().manual_seed(3)).to(dtype)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    below = min(layer.kernel_switch_rows(dtype))  # float x (int8 weights here) or capped int8 x: 9 rows
    assert below == (1000 if layer._int8_max_rows == NEVER else 9)
    for m in range(2, min(below, len(x) + 1)):
        assert torch.equal(layer(x[:m]), alone[:m]), m


@pytest.mark.parametrize("flags,rows", [
    ({"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma", "f16c"}, NEVER),  # VNNI: every GEMV call
    ({"avx2", "fma", "f16c"}, FLOAT_GEMV_MAX_ROWS),  # AVX2: decode-sized calls, not short prompts' prefill
    ({"avx512f", "avx512bw", "avx2", "fma", "f16c"}, 0),  # no integer path built: int8 x would be floats again
    (set(), 0),
])
def test_which_calls_quantize_x_by_default(monkeypatch, flags, rows):
    from pernode.serve.kernels import cpu_features
    from pernode.serve.kernels.quant_linear import int8_input_max_rows

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv("PERNODE_QUANT_INPUT")
    assert int8_input_max_rows(4, 576, 32) == rows
    assert int8_input_max_rows(8, 576, 32) == 0  # int8 weights keep float x
    assert int8_input_max_rows(4, 560, None) == 0  # 560 is not a whole number of 32-value blocks
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "int8")
    assert int8_input_max_rows(4, 576, 32) == NEVER and int8_input_max_rows(8, 576, 32) == 0
    monkeypatch.setenv("PERNODE_QUANT_INPUT", "float")
    assert int8_input_max_rows(4, 576, 32) == 0


def test_capped_int8_x_changes_kernel_at_nine_rows(monkeypatch):
    # On AVX2 a decode-sized call quantizes x and a longer one does not: a speculative verify step must stay below
    # that switch, and the fused decoder must pick the same kernel per row count as the layer.
    from pernode.serve.kernels import cpu_features

    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.delenv("PERNODE_QUANT_INPUT")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "1000")
    monkeypatch.setenv("PERNODE_DECODE_INT8_ROWS", "24")  # decode steps keep int8 x further (fused_decode.py)
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "off")  # its own switch (tests/test_fused_decode.py)
    layer = _random_layer(QuantScheme(4, 32, symmetric=False), 576, 200)
    assert layer.kernel_switch_rows(torch.float32) == [FLOAT_GEMV_MAX_ROWS + 1, 25, 1000]
    assert layer.gemv_quantizes_input(FLOAT_GEMV_MAX_ROWS) and not layer.gemv_quantizes_input(FLOAT_GEMV_MAX_ROWS + 1)
    assert layer.gemv_args(1)[0] is layer.gemv_args(9)[0] and layer.gemv_args(9)[1].dtype == torch.float32
    x = torch.randn(12, 576, generator=torch.Generator().manual_seed(5))
    for m in (1, 8, 9, 12):
        ref = woq_linear_reference(x[:m], layer.qweight, layer.weight_scale, layer.weight_zero_point, 4, 32,
                                   quantize_input=m <= FLOAT_GEMV_MAX_ROWS)
        torch.testing.assert_close(layer(x[:m]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma", "f16c"}, True),  # VNNI's vpdpbusd
    ({"avx512f", "avx512bw", "avx2", "fma", "f16c"}, False),  # AVX-512 without VNNI: the AVX2 path is not built
    ({"avx2", "fma", "f16c"}, True),  # AVX2's vpmaddubsw
    ({"avx", "sse4_2"}, False),
    (set(), False),  # flags unreadable (not Linux)
])
def test_which_cpus_multiply_int8_x_natively(monkeypatch, flags, expected):
    from pernode.serve.kernels import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    assert cpu_features.multiplies_int8_natively() is expected
