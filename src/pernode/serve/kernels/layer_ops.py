"""RMSNorm (alone and fused with the residual add before it), rotary embedding and SwiGLU's silu-and-mul of the
decoder layer: one C++ call each on CPU (csrc/layer_ops.h), plain torch elsewhere, and the plain-torch versions
are the references the kernels are held to.

At decode a layer sees one row per sequence, so these ops are all dispatch: RMSNorm is ~6 torch ops (~20 us) and
rotating q and k ~12 (~40 us), against ~5 us for one call into C++. Across 30 layers that is ~2.5 ms of a 13 ms
int4 decode step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pernode import envs
from pernode.envs import KernelChoice
from pernode.serve.kernels.jit import build_path, load_extension

SOURCE = "layer_ops.cpp"


def native_by_default() -> bool:
    """PERNODE_LAYER_OPS: what a layer built now uses. Layers read it once (a decode step makes ~90 of these calls,
    and reading the environment costs microseconds); direct calls without `native` read it each time."""
    return envs.layer_ops_kernel() is KernelChoice.NATIVE


def _use_kernel(native: bool | None, *tensors: torch.Tensor) -> bool:
    # the ops have no autograd formula: anything that needs gradients takes the torch path
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (tensors[0].device.type == "cpu" and not needs_grad and load_extension(SOURCE)
            and (native_by_default() if native is None else native))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in fp32, normalised value rounded to x's dtype, then times the weight (HF's LlamaRMSNorm)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, native: bool | None = None) -> torch.Tensor:
    if x.dtype == weight.dtype and _use_kernel(native, x, weight):
        return torch.ops.pernode.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, RMSNorm of it): a decoder layer's residual add and the norm that follows it."""
    total = x + residual
    return total, rms_norm_reference(total, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over each row for the residual add and the RMSNorm after it (one call instead of ~7 ops)."""
    if (x.dtype == residual.dtype == weight.dtype and x.shape == residual.shape
            and _use_kernel(native, x, residual, weight)):
        return torch.ops.pernode.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation (Shazeer, arXiv 2002.05202) of a fused [gate | up] projection: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """SwiGLU's activation. torch's two ops unless `native=True` asks for the fused kernel: they are vectorised
    (Sleef's exp) and the kernel's loop is not; on this CPU (AVX-512, 1 thread) the kernel took 1.7x (1 row) to 4.6x
    (256 rows) the CPU time of the two ops in bf16, and 1.3-3.5x in fp32 (docs/benchmarks.md, "Where a mixed step's
    time goes"). Under --compile inductor fuses the two ops anyway."""
    if native is True and gate_up.dim() == 2 and gate_up.shape[-1] % 2 == 0 and _use_kernel(native, gate_up):
        return torch.ops.pernode.silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def rotary_embedding_reference_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                num_heads: int, head_dim: int) -> torch.Tensor:
    """Rotate the first `num_heads` heads of each row of qkv [T, width] in place (rotate-half layout)."""
    heads = qkv[:, : num_heads * head_dim].unflatten(-1, (num_heads, head_dim))
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    x1, x2 = heads.float().chunk(2, dim=-1)
    heads.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    return qkv


def rotary_embedding_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_heads: int, head_dim: int, native: bool | None = None) -> torch.Tensor:
    """In place: q and k heads of a fused qkv projection's output rotated by their positions' angles."""
    if qkv.dim() == 2 and qkv.stride(-1) == 1 and _use_kernel(native, qkv):
        torch.ops.pernode.rotary_embedding_(qkv, positions, cos, sin, num_heads, head_dim)
        return qkv
    return rotary_embedding_reference_(qkv, positions, cos, sin, num_heads, head_dim)


def build_kernels():
    """Build the kernels now (e.g. from the Makefile) and return their build folder, or None if it failed."""
    return build_path(SOURCE)
