"""The compute-bound path of quantized linears (woq_gemm: dequantized tiles through a GEMM in x's dtype) held to
the plain-torch reference over ragged shapes, and the GEMV/GEMM choice: crossovers from measured lines, cached per
shape from repeated, interleaved timings (medians, agreement), overridable, and honoured by QuantLinear.forward."""
from __future__ import annotations

import json

import pytest
import torch

from pernode.quant_format import QuantScheme, quantize_weight
from pernode.serve.kernels import gemm_dispatch
from pernode.serve.kernels.gemm_dispatch import (MIN_ROWS, NEVER, PROBE_ROWS, ROUNDS, LinearShape,
                                                    gemm_from_rows)
from pernode.serve.kernels.quant_linear import QuantLinear, load_kernel, unpacked_weight, woq_linear_reference

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


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("in_features", [96, 616])
def test_dequantized_tiles_are_exactly_u_times_scale_plus_bias(scheme, in_features):
    """x = I gives the tiles themselves (each output is one product by 1.0): they must be u * scale + bias rounded
    twice, as the scalar loop computes them, whichever vector unit dequantized them (616 = 19 groups of 32 plus 8:
    a per-channel group with a tail off every vector step)."""
    if scheme.group_size and in_features % scheme.group_size:
        pytest.skip("group does not divide")
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable: the reference is what runs")
    layer = _layer(scheme, in_features, 40)
    bits, gs = scheme.num_bits, scheme.group_size or in_features
    u = unpacked_weight(layer.qweight, bits, in_features).float() + (8 if bits == 4 else 0)  # the stored integer
    scale = layer._scale.repeat_interleave(gs, dim=1)
    bias = (layer._zero_term.repeat_interleave(gs, dim=1) if layer._zero_term is not None
            else (-8.0 * scale if bits == 4 else torch.zeros_like(scale)))
    expected = (u * scale + bias).t()
    eye = torch.eye(in_features)
    assert torch.equal(torch.ops.pernode.woq_gemm(eye, *layer._op_args[:5]), expected)
    assert torch.equal(layer._op(eye, *layer._float_op_args, False), expected)  # the float-x op's tiled matmul
    assert torch.equal(torch.ops.pernode.woq_gemm(eye.bfloat16(), *layer._op_args[:5]), expected.bfloat16())


def test_gemm_rejects_bad_operands():
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    layer = _layer(QuantScheme(4, 32), 64, 16)
    with pytest.raises(RuntimeError, match="woq_gemm"):
        torch.ops.pernode.woq_gemm(torch.randn(2, 32), *layer._op_args[:5])
    with pytest.raises(RuntimeError, match="woq_gemm"):
        torch.ops.pernode.woq_gemm(torch.randn(2, 64).half(), *layer._op_args[:5])


LADDER = (4, 8, 16, 32, 64)


def _samples(times: list[float], noise: list[float]) -> list[list[float]]:
    """Each row count's true time, times a per-round disturbance."""
    return [[t * n for n in noise] for t in times]


def test_crossing_is_found_between_measured_row_counts():
    gemv = [1.0, 2.0, 4.0, 8.0, 16.0]  # streams the weights again every 4 rows
    gemm = [3.0, 3.5, 4.5, 6.0, 9.0]  # a fixed tile cost, then compute per row
    # ratio 1.125 at 16 rows, 0.75 at 32: 16 + 16 * 0.125 / 0.375 = 21.3 -> 22
    assert gemm_dispatch.crossing(LADDER, [g / v for v, g in zip(gemv, gemm)]) == 22
    assert gemm_dispatch.crossing(LADDER, [0.5] * 5) == MIN_ROWS  # GEMM wins everywhere
    assert gemm_dispatch.crossing(LADDER, [2.0] * 5) == NEVER  # never: no extrapolation past the probes
    # a GEMM win at 8 rows that does not hold at 16 is not a crossing: the GEMM must win from there on
    assert gemm_dispatch.crossing(LADDER, [3.0, 0.95, 1.125, 0.75, 0.56]) == 22


def test_crossover_from_samples_takes_medians_and_measures_agreement():
    gemv, gemm = [1.0, 2.0, 4.0, 8.0, 16.0], [3.0, 3.5, 4.5, 6.0, 9.0]
    quiet = gemm_dispatch.crossover_from_samples(LADDER, _samples(gemv, [1.0] * 5), _samples(gemm, [1.0] * 5))
    assert quiet.rows == 22 and quiet.agreement == 1.0 and quiet.settled
    # Load that drifts between rounds scales both kernels of a pair alike: no effect on the ratios.
    drift = gemm_dispatch.crossover_from_samples(LADDER, _samples(gemv, [1, 3, 1, 5, 2]), _samples(gemm, [1, 3, 1, 5, 2]))
    assert drift == quiet
    # One round where a burst of load hit only the GEMV at 8 and 16 rows: the median ignores it, the round dissents.
    gemv_s = _samples(gemv, [1.0] * 5)
    gemv_s[1][2] = gemv_s[2][2] = 10.0
    one_burst = gemm_dispatch.crossover_from_samples(LADDER, gemv_s, _samples(gemm, [1.0] * 5))
    assert one_burst.rows == 22 and one_burst.agreement == pytest.approx(0.8) and one_burst.settled
    # Rounds that disagree (two see the GEMM win everywhere, two never): not settled, so not cached.
    gemm_s = _samples(gemm, [3.0, 3.0, 0.2, 0.2, 1.0])
    noisy = gemm_dispatch.crossover_from_samples(LADDER, _samples(gemv, [1.0] * 5), gemm_s)
    assert noisy.rows == 22 and noisy.agreement == pytest.approx(0.2) and not noisy.settled
    with pytest.raises(ValueError, match="same number"):
        gemm_dispatch.crossover_from_samples(LADDER, _samples(gemv, [1.0] * 5), _samples(gemm, [1.0] * 4))


def test_measurement_stops_early_and_pools_repeats_when_rounds_disagree(monkeypatch):
    weight = torch.randn(256, 256)

    def gemv(x):  # real work beside a GEMM that does none: the GEMM wins at every row count
        return torch.cat([x] * 16, dim=1) @ weight

    def gemm(x):
        return x

    probed, gemv_s, gemm_s = gemm_dispatch.time_probes(gemv, gemm, 16, torch.float32, rounds=5)
    # the ladder stops once the GEMM has won at two probes in a row
    assert probed == (4, 8) and all(len(s) == 5 for s in gemv_s + gemm_s)
    assert gemm_dispatch.time_probes(gemv, gemm, 16, torch.float32, rounds=1, stop_early=False)[0] == PROBE_ROWS
    attempts = []
    monkeypatch.setattr(gemm_dispatch, "crossover_from_samples",
                        lambda rows, v, g: attempts.append(len(v[0])) or gemm_dispatch.CrossoverEstimate(8, 0.2))
    assert gemm_dispatch.measure_crossover(gemv, gemm, 16, torch.float32).rows == 8
    assert attempts == [ROUNDS, 2 * ROUNDS, 3 * ROUNDS]  # re-measured, pooled, up to MAX_ATTEMPTS


def test_crossover_is_measured_once_and_cached_per_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("PERNODE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("PERNODE_GEMM_FROM_ROWS", raising=False)
    monkeypatch.delenv("PERNODE_REMEASURE_KERNELS", raising=False)
    (tmp_path / gemm_dispatch.CACHE_FILE).write_text(json.dumps({"lines-8-64|old|N=64": 86}))
    gemm_dispatch.forget_measurements()
    calls = []
    monkeypatch.setattr(gemm_dispatch, "measure_crossover",
                        lambda *a: calls.append(a) or gemm_dispatch.CrossoverEstimate(24, 1.0))
    counted = None
    shape = LinearShape(64, 32, 4, 32, True, True, torch.float32, 1)
    first = gemm_from_rows(shape, "quant_linear.cpp", counted, counted)
    assert calls and first == 24
    entries = json.loads((tmp_path / gemm_dispatch.CACHE_FILE).read_text())
    # the older method's entry is dropped; the new key names the method
    assert list(entries.values()) == [first] and "N=64|K=32|w4g32" in next(iter(entries))
    assert next(iter(entries)).startswith(gemm_dispatch.METHOD + "|")
    calls.clear()
    gemm_dispatch.forget_measurements()  # a new process: the file answers
    assert gemm_from_rows(shape, "quant_linear.cpp", counted, counted) == first and not calls
    gemm_dispatch.forget_measurements()
    monkeypatch.setenv("PERNODE_REMEASURE_KERNELS", "1")  # measured again despite the cached entry
    gemm_from_rows(shape, "quant_linear.cpp", counted, counted)
    assert calls
    monkeypatch.setenv("PERNODE_REMEASURE_KERNELS", "maybe")
    gemm_dispatch.forget_measurements()
    with pytest.raises(ValueError, match="PERNODE_REMEASURE_KERNELS"):
        gemm_from_rows(shape, "quant_linear.cpp", counted, counted)
    monkeypatch.delenv("PERNODE_REMEASURE_KERNELS")
    gemm_dispatch.forget_cached_crossovers()  # `pernode profile --remeasure-kernels`
    assert json.loads((tmp_path / gemm_dispatch.CACHE_FILE).read_text()) == {}
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "7")
    assert gemm_from_rows(shape, "quant_linear.cpp", counted, counted) == 7
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "0")
    with pytest.raises(ValueError, match="PERNODE_GEMM_FROM_ROWS"):
        gemm_from_rows(shape, "quant_linear.cpp", counted, counted)
    gemm_dispatch.forget_measurements()


def test_unsettled_crossover_serves_the_process_but_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PERNODE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("PERNODE_GEMM_FROM_ROWS", raising=False)
    gemm_dispatch.forget_measurements()
    monkeypatch.setattr(gemm_dispatch, "measure_crossover", lambda *a: gemm_dispatch.CrossoverEstimate(40, 0.4))
    shape = LinearShape(64, 32, 4, 32, True, True, torch.float32, 1)
    assert gemm_from_rows(shape, "quant_linear.cpp", lambda x: x, lambda x: x) == 40
    assert not (tmp_path / gemm_dispatch.CACHE_FILE).exists()
    gemm_dispatch.forget_measurements()


@pytest.mark.usefixtures("int8_x")
def test_forward_runs_the_gemv_below_and_the_gemm_from_the_crossover(monkeypatch):
    if load_kernel() is None:
        pytest.skip("C++ kernel unavailable")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "6")
    layer = _layer(QuantScheme(4, 32, symmetric=False, float_min=True), 128, 48)
    assert layer.gemm_from_rows(torch.float32) == 6
    below, above = torch.randn(5, 128), torch.randn(6, 128)
    assert layer.gemv_quantizes_input(5) and not layer.gemv_quantizes_input(6)
    torch.testing.assert_close(layer(below), torch.ops.pernode.woq_linear(below, *layer._op_args, True))
    gemm = (torch.ops.pernode.woq_gemm_int16x(above, *layer._op_args[:3], *layer._op_args[4:6])
            if layer.gemm_takes_int16 else torch.ops.pernode.woq_gemm(above, *layer._op_args[:5]))
    torch.testing.assert_close(layer(above), gemm)
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
