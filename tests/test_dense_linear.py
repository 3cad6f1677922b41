"""The decode GEMV behind pernode's Linear, held to F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pernode.serve.kernels import dense_linear
from pernode.serve.kernels.jit import load_extension

pytestmark = pytest.mark.skipif(not load_extension(dense_linear.SOURCE), reason="C++ GEMV unavailable")


@pytest.mark.parametrize("in_features,bias", [(576, False), (100, True), (1536, False)])  # 100: a scalar tail
@pytest.mark.parametrize("threads", [0, 1])
def test_gemv_matches_f_linear(in_features, bias, threads):
    torch.manual_seed(0)
    layer = dense_linear.Linear(in_features, 300, bias=bias)
    for m in range(1, dense_linear.MAX_ROWS + 1):
        x = torch.randn(m, in_features)
        with torch.inference_mode():
            y = torch.ops.pernode.dense_gemv(x, layer.weight, layer.bias, threads)
            torch.testing.assert_close(layer(x), y)
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features", [576, 100])  # 100: a scalar tail on every CPU
def test_gemv_row_does_not_depend_on_the_rows_beside_it(in_features):
    # As for the quantized GEMV (tests/test_quant_kernels.py): speculative verification runs k + 1 rows together and
    # each must come out bit for bit as its one-row decode, on CPUs with and without AVX-512 alike.
    torch.manual_seed(0)
    layer = dense_linear.Linear(in_features, 300, bias=True)
    x = torch.randn(dense_linear.MAX_ROWS, in_features)
    with torch.inference_mode():
        alone = torch.cat([torch.ops.pernode.dense_gemv(x[i:i + 1], layer.weight, layer.bias, 1) for i in range(len(x))])
        for m in range(2, len(x) + 1):
            assert torch.equal(torch.ops.pernode.dense_gemv(x[:m], layer.weight, layer.bias, 1), alone[:m]), m


def test_other_shapes_and_autograd_take_f_linear(monkeypatch):
    calls = []
    real = torch.ops.pernode.dense_gemv

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape[0])
            return real(*a)

    monkeypatch.setattr(torch.ops.pernode, "dense_gemv", Spy())
    layer = dense_linear.Linear(64, 32)
    with torch.inference_mode():
        layer(torch.randn(3, 64))  # kernel
        layer(torch.randn(dense_linear.MAX_ROWS + 1, 64))  # GEMM
        layer(torch.randn(2, 64).bfloat16().float())  # still fp32: kernel
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()  # autograd: F.linear
    assert calls == [3, 2] and x.grad is not None
