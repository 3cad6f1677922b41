"""The decoder layer's C++ RMSNorm and rotary embedding, held to their plain-torch references."""
from __future__ import annotations

import pytest
import torch

from pernode.serve.kernels import layer_ops
from pernode.serve.kernels.jit import load_extension

pytestmark = pytest.mark.skipif(not load_extension(layer_ops.SOURCE), reason="C++ layer ops unavailable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 130])  # 130: the multi-threaded path
def test_rms_norm_matches_reference(dtype, rows):
    torch.manual_seed(0)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    w = torch.rand(576).to(dtype)
    y = torch.ops.pernode.rms_norm(x, w, 1e-5)
    ref = layer_ops.rms_norm_reference(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 100])
def test_rotary_in_place_matches_reference_and_leaves_v_alone(dtype, rows):
    torch.manual_seed(0)
    heads, kv, d = 9, 3, 64
    width = (heads + 2 * kv) * d
    qkv = torch.randn(rows, width).to(dtype)
    positions = torch.randint(0, 512, (rows,))
    angles = torch.outer(torch.arange(512, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = angles.cos(), angles.sin()
    ref = layer_ops.rotary_embedding_reference_(qkv.clone(), positions, cos, sin, heads + kv, d)
    out = qkv.clone()
    torch.ops.pernode.rotary_embedding_(out, positions, cos, sin, heads + kv, d)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(out[:, (heads + kv) * d:], qkv[:, (heads + kv) * d:])  # v untouched
    with pytest.raises(RuntimeError, match="outside the table"):
        torch.ops.pernode.rotary_embedding_(out, torch.full((rows,), 512), cos, sin, heads + kv, d)


def test_gradients_take_the_torch_path():
    x = torch.randn(2, 64, requires_grad=True)
    w = torch.ones(64)
    layer_ops.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_parameters_that_require_grad_still_use_the_kernel_under_inference_mode(monkeypatch):
    calls = []
    real = torch.ops.pernode.rms_norm

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    w = torch.nn.Parameter(torch.ones(64))
    monkeypatch.setattr(torch.ops.pernode, "rms_norm", Spy())
    with torch.inference_mode():
        layer_ops.rms_norm(torch.randn(1, 64), w, 1e-5)
    assert calls == [1]
