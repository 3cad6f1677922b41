"""A Linear stored as compressed-tensors' sparse-bitmask (the nonzeros + one bit per weight) whose decode-sized fp32
or bf16 calls run the C++ bitmask GEMV in csrc/sparse_gemv.cpp, and, on CUDA, 2:4 weights through torch's
semi-structured sparse GEMM. Magnitude/Wanda/SparseGPT (arXiv 2301.00774) pruning leaves no structure the CPU's
GEMMs can use; a GEMV that streams fewer bytes can, when decode is bandwidth-bound and enough weights are gone.

Where it pays was measured by benchmarks/pruning_speed.py against the dense GEMV on the same layers (docs/pruning.md),
per vector unit: the gates below are those crossovers, and the loader says "no speedup at this sparsity" for a
checkpoint under its CPU's gate instead of running the slower path. Larger batches (prefill chunks) expand the weight to dense and use the GEMM.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pernode import envs
from pernode.envs import KernelChoice
from pernode.serve.kernels import cpu_features
from pernode.serve.kernels.jit import build_path, load_extension
from pernode.sparse_format import SparsityPattern, compress_bitmask, decompress

log = logging.getLogger("pernode.serve")

SOURCE = "sparse_gemv.cpp"


@dataclass(frozen=True)
class SparseGate:
    """Where the bitmask GEMV measured faster than the dense GEMV (benchmarks/pruning_speed.py, docs/pruning.md):
    from `min_sparsity` zeros, for calls of up to `max_rows` rows (more rows are compute-bound: the dense GEMM)."""

    min_sparsity: float
    max_rows: int
    vector_unit: str


# AVX-512 expands 16 columns in one vexpandps: 1.5-2x at 50% zeros. AVX2 permutes 8 at a time from a table, so it
# is closer to bound by instructions than by bytes: over five runs 0.8-1.4x at 50% zeros (1 row), 1.0-1.5x at 70%,
# 1.4-1.75x at 90%, and dense wins from 8 rows.
AVX512_GATE = SparseGate(0.5, 8, "AVX-512")
AVX2_GATE = SparseGate(0.7, 4, "AVX2")


def sparse_gate() -> SparseGate | None:
    """This CPU's gate; None where the kernel has no vector path (its scalar loop is ~20x slower than dense)."""
    flags = cpu_features.cpu_flags()
    if "avx512f" in flags:
        return AVX512_GATE
    if {"avx2", "fma"} <= flags:
        return AVX2_GATE
    return None

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the values' dtypes the kernel reads (x in the same dtype)


class SparseLinear(nn.Module):
    """y = x W^T (+ b) with W [out, in] held as `values` (nonzeros, row-major), `bitmask` [out, ceil(in/8)] and
    `row_offsets` [out]: compressed-tensors' sparse-bitmask layout, as the checkpoint stores it. The values keep
    their dtype when the kernel reads it (fp32, bf16) and are held in fp32 otherwise."""

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, bitmask: torch.Tensor,
                 row_offsets: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        keep_dtype = values.dtype in KERNEL_DTYPES
        self.register_buffer("values", (values if keep_dtype else values.float()).contiguous())
        self.register_buffer("bitmask", bitmask.to(torch.uint8).contiguous())
        self.register_buffer("row_offsets", row_offsets.to(torch.int64).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        gate = sparse_gate()
        self.max_kernel_rows = gate.max_rows if gate is not None and envs.sparse_kernel() is KernelChoice.NATIVE else 0
        self.gemv_threads = envs.quant_threads()

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        parts = compress_bitmask(linear.weight.detach())
        return cls(linear.in_features, linear.out_features, parts["compressed"], parts["bitmask"],
                   parts["row_offsets"], linear.bias)

    @property
    def sparsity(self) -> float:
        return 1 - self.values.numel() / (self.in_features * self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return decompress({"shape": torch.tensor([self.out_features, self.in_features]), "compressed": self.values,
                           "bitmask": self.bitmask}).to(self.values.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and x.shape[0] <= self.max_kernel_rows and x.dtype == self.values.dtype
                and x.device.type == "cpu" and load_extension(SOURCE)):
            return torch.ops.pernode.sparse_gemv(x, self.values, self.bitmask, self.row_offsets, self.bias,
                                                 self.gemv_threads)
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity:.2f}"


def sparse_linear_reference(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                            in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: expand the weight, then F.linear (what the kernel is held to)."""
    w = decompress({"shape": torch.tensor([bitmask.shape[0], in_features]), "compressed": values, "bitmask": bitmask})
    return F.linear(x, w, bias)


class SemiStructuredLinear(nn.Module):
    """2:4 weights on CUDA through torch.sparse.to_sparse_semi_structured (fp16 sparse tensor cores); x is cast to
    fp16 and the result back to x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(linear.weight.detach().half()),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().half(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.half(), self.weight, self.bias).to(x.dtype)


def semi_structured_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.sparse, "to_sparse_semi_structured")


def _decoder_linears(model):
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr, module in list(parent.named_children()):
                if isinstance(module, nn.Linear):
                    yield parent, attr, module


@torch.no_grad()
def use_sparse_kernels(model, sparsity_structure: str = "unstructured", min_sparsity: float | None = None) -> int:
    """Swap the decoder's float projections for SparseLinear (CPU) or SemiStructuredLinear (CUDA, 2:4) where that
    measured faster (min_sparsity: the CPU's gate unless given); log one line saying what runs where, including "no
    speedup at this sparsity". Returns how many projections were swapped."""
    linears = list(_decoder_linears(model))
    if not linears:  # quantized weights: the zeros are stored as int4/int8 values and run the dense int kernels
        log.warning("pernode: sparse quantized checkpoint: no sparse kernel for quantized weights, the zeros run "
                    "through the dense int kernels (no speedup from sparsity; the size gain is the quantization's)")
        return 0
    device = linears[0][2].weight.device
    pattern = SparsityPattern.parse(sparsity_structure)
    if (pattern.n, pattern.m) == (2, 4) and semi_structured_available(device):
        for parent, attr, lin in linears:
            setattr(parent, attr, SemiStructuredLinear(lin))
        log.info("pernode: 2:4 sparse projections run torch's semi-structured sparse GEMM on %s", device)
        return len(linears)
    zeros = sum(int((lin.weight == 0).sum()) for _, _, lin in linears)
    sparsity = zeros / sum(lin.weight.numel() for _, _, lin in linears)
    gate = sparse_gate()
    if (device.type != "cpu" or gate is None or envs.sparse_kernel() is not KernelChoice.NATIVE
            or not load_extension(SOURCE)):
        log.warning("pernode: sparse checkpoint (%.0f%% zeros) served dense: no sparse kernel on %s here%s",
                    100 * sparsity, device.type, " (no AVX2 or AVX-512)" if device.type == "cpu" and not gate else "")
        return 0
    min_sparsity = gate.min_sparsity if min_sparsity is None else min_sparsity
    dtype = linears[0][2].weight.dtype
    if dtype not in KERNEL_DTYPES:
        log.warning("pernode: sparse checkpoint (%.0f%% zeros) served dense in %s: the bitmask GEMV reads float32 "
                    "or bfloat16", 100 * sparsity, str(dtype).removeprefix("torch."))
        return 0
    if sparsity < min_sparsity:
        log.warning("pernode: sparse checkpoint at %.0f%% zeros: no speedup at this sparsity (the bitmask GEMV "
                    "measured faster than dense from %.0f%% with %s); served dense", 100 * sparsity,
                    100 * min_sparsity, gate.vector_unit)
        return 0
    for parent, attr, lin in linears:
        setattr(parent, attr, SparseLinear.from_dense(lin))
    log.info("pernode: sparse checkpoint at %.0f%% zeros: decode steps of <= %d rows run the %s bitmask GEMV (%s)",
             100 * sparsity, gate.max_rows, str(dtype).removeprefix("torch."), gate.vector_unit)
    return len(linears)


def build_kernels():
    """Build the kernel now (e.g. from the Makefile) and return its build folder, or None if it failed."""
    return build_path(SOURCE)
