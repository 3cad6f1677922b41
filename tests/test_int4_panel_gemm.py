"""The int4 panel kernel (csrc/int4_panel_gemm.h) held to the plain-torch reference of the int8-x GEMV it stands in
for, over ragged shapes, every int4 qparam form, fp32/fp16 qparams and fp32/bf16 x; each row's result independent
of the rows beside it; and the layer's three-way dispatch (GEMV, panel, GEMM) by its crossovers."""
from __future__ import annotations

import pytest
import torch

from pernode.serve.kernels.gemm_dispatch import NEVER, forget_measurements
from pernode.serve.kernels.quant_linear import (PANEL_MAX_ROWS, PANEL_MEASURED_MIN_ROWS, QuantLinear, fp16_if_exact,
                                                load_kernel, woq_linear_reference)

from int4_layers import SCHEMES, int4_layer

pytestmark = [pytest.mark.skipif(load_kernel() is None, reason="C++ kernel unavailable"),
              pytest.mark.usefixtures("int8_x")]  # the panel kernel takes int8 x: on every CPU, not only VNNI's

_layer = int4_layer


def _panel(layer: QuantLinear, x: torch.Tensor, qparams: str = "as-stored", threads: int = 0) -> torch.Tensor:
    scale, term = layer._scale, layer._zero_term
    if qparams == "as-stored":  # what the layer hands the kernel: fp16 where exact
        scale, term = fp16_if_exact(scale, term)
    return torch.ops.pernode.woq_panel_gemm(x, layer.qweight, scale, term, layer.scheme.group_size or 0, threads)


def _exactly_quantizable(m: int, k: int, seed: int) -> torch.Tensor:
    """x whose per-32 int8 quantization is exact (each block's max is 127 times a power of two): no rounding ties,
    so the kernel and the reference see the same int8 values and differ by fp32 summation order alone."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-126, 127, (m, k // 32, 32), generator=gen).float()
    q[..., 0] = 127.0 * torch.sign(torch.randn(m, k // 32, generator=gen)).clamp(min=0).mul(2).sub(1)
    scale = torch.pow(2.0, torch.randint(-6, 3, (m, k // 32, 1), generator=gen).float())
    return (q * scale).reshape(m, k)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return woq_linear_reference(x, layer.qweight, layer.weight_scale, layer.weight_zero_point, 4,
                                layer.scheme.group_size, quantize_input=True, weight_min=layer.weight_min)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("in_features,out_features", [(1536, 576), (256, 40), (128, 17)])
def test_panel_matches_the_int8_x_reference_over_ragged_shapes(scheme, in_features, out_features):
    layer = _layer(SCHEMES[scheme], in_features, out_features)
    for m in (1, 5, 6, 7, 13, 48, 64):  # register blocks of 6 rows and every tail
        x = _exactly_quantizable(m, in_features, seed=m)
        ref = _reference(layer, x)
        for qparams in ("as-stored", "fp32"):
            got = _panel(layer, x, qparams)
            assert got.dtype == torch.float32 and got.shape == (m, out_features)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_panel_agrees_with_the_gemv_and_keeps_bf16_in_bf16_out():
    layer = _layer(SCHEMES["q4_1"], 576, 3072)
    x = _exactly_quantizable(24, 576, seed=2).bfloat16()  # exact in bf16 too
    got = _panel(layer, x)
    assert got.dtype == torch.bfloat16
    gemv = layer._run_gemv(x)  # same int8 products, another fp32 summation order
    assert (got.float() - gemv.float()).abs().max() <= 0.02 * gemv.float().abs().max()
    ref = _reference(layer, x.float())
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=1e-4 * ref.abs().max().item())  # bf16 rounding


def test_each_rows_result_does_not_depend_on_the_rows_beside_it():
    """Speculative verification relies on it below a kernel switch: a row gives the same bits in any batch."""
    layer = _layer(SCHEMES["q4_1"], 576, 576)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(3))
    full = _panel(layer, x)
    for lo, hi in ((0, 1), (3, 10), (17, 40), (5, 6)):
        assert torch.equal(_panel(layer, x[lo:hi]), full[lo:hi])
    assert torch.equal(_panel(layer, x, threads=1), _panel(layer, x, threads=2))


def test_bad_shapes_are_refused_with_the_field():
    layer = _layer(SCHEMES["q4_1"], 128, 32)
    with pytest.raises(RuntimeError, match="weight shape"):
        torch.ops.pernode.woq_panel_gemm(torch.randn(2, 64), layer.qweight, layer._scale, layer._zero_term, 32)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.pernode.woq_panel_gemm(torch.randn(2, 128).half(), layer.qweight, layer._scale, layer._zero_term,
                                         32)


def test_layer_dispatch_runs_gemv_then_panel_then_gemm(monkeypatch):
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "5")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "30")
    monkeypatch.setenv("PERNODE_DECODE_INT8_ROWS", "40")
    forget_measurements()
    layer = _layer(SCHEMES["q4_1"], 256, 96)
    assert layer.panel_from_rows(torch.float32) == 5 and layer.gemm_from_rows(torch.float32) == 30
    assert layer.decode_int8_max_rows(torch.float32) == 40  # decode steps keep the panel to 40 rows (fused_decode)
    assert layer.kernel_switch_rows(torch.float32) == [5, 30, 41]
    calls = []
    for name in ("_run_gemv", "_run_panel", "_run_gemm"):
        original = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda x, n=name, f=original: calls.append(n) or f(x))
    for m in (4, 5, 29, 30):
        layer(torch.randn(m, 256))
    assert calls == ["_run_gemv", "_run_panel", "_run_panel", "_run_gemm"]
    assert layer.gemv_quantizes_input(29) and not layer.gemv_quantizes_input(30)


def test_the_panel_is_measured_by_default_and_off_when_asked(monkeypatch):
    monkeypatch.delenv("PERNODE_PANEL_FROM_ROWS", raising=False)
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "100000")
    forget_measurements()
    layer = _layer(SCHEMES["q4_1"], 256, 96)
    rows = layer.panel_from_rows(torch.float32)
    assert PANEL_MEASURED_MIN_ROWS <= rows <= PANEL_MAX_ROWS or rows == NEVER
    assert layer.gemm_from_rows(torch.float32) == 100000  # prompt chunks keep the GEMV/GEMM crossover
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "off")
    layer.post_load()
    assert layer.panel_from_rows(torch.float32) == NEVER


def test_a_measured_panel_crossover_lies_in_the_decode_rows(monkeypatch):
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "measure")
    monkeypatch.setenv("PERNODE_GEMM_FROM_ROWS", "100000")
    forget_measurements()
    rows = _layer(SCHEMES["q4_1"], 256, 96).panel_from_rows(torch.float32)
    assert PANEL_MEASURED_MIN_ROWS <= rows <= PANEL_MAX_ROWS or rows == NEVER  # never within the GEMV's first pass


def test_panel_serves_decode_sized_steps_only(monkeypatch):
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", str(PANEL_MAX_ROWS + 1))
    monkeypatch.delenv("PERNODE_GEMM_FROM_ROWS", raising=False)
    layer = _layer(SCHEMES["q4_1"], 128, 32)
    assert layer.panel_from_rows(torch.float32) == NEVER


def test_bad_panel_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("PERNODE_PANEL_FROM_ROWS", "0")
    layer = _layer(SCHEMES["q4_1"], 128, 32)
    with pytest.raises(ValueError, match="PERNODE_PANEL_FROM_ROWS"):
        layer.panel_from_rows(torch.float32)


def test_default_engine_keeps_the_bf16_gemm_for_a_short_chat_prompt(monkeypatch):
    """With the panel off (the default) a ~35-token chat prompt runs through the bf16 GEMM and the default model
    answers its near-tie question as fp32 does; the panel's int8 activations flip it (docs/threads.md)."""
    from pernode.config import EngineConfig
    from pernode.serve.engine.llm_engine import LLMEngine
    from pernode.serve.llm import LLM
    from pernode.serve.sampling.params import SamplingParams

    monkeypatch.delenv("PERNODE_PANEL_FROM_ROWS", raising=False)
    monkeypatch.delenv("PERNODE_GEMM_FROM_ROWS", raising=False)
    monkeypatch.delenv("PERNODE_QUANT_INPUT", raising=False)  # the engine's own default, not this module's int8 x
    llm = LLM.from_engine(LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_bytes=64 * 2**20)))
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert out.text.startswith("The capital of France is Paris"), out.text
