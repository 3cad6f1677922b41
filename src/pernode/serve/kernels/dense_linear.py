"""nn.Linear whose decode-sized fp32 calls (<= 4 rows) run the C++ GEMV in csrc/dense_gemv.h.

oneDNN's fp32 GEMM is a poor fit for the rows a decode step has: for SmolLM2's 49152 x 576 lm_head it streams
~10 GB/s at one row and takes 23-34 ms at two or three rows against 16 ms at four (measured, 1 thread), which made
batch 2 and 3 decode steps slower than batch 4. The GEMV reads each weight row once per call for up to 4 rows:
6 ms at one row, 5 at two. Everything else (more rows, other dtypes or devices, autograd) is plain F.linear,
which is also the reference the kernel is held to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pernode import envs
from pernode.envs import KernelChoice
from pernode.serve.kernels.jit import build_path, load_extension

SOURCE = "dense_gemv.cpp"
MAX_ROWS = 4  # measured: at 8 rows oneDNN's GEMM is faster again


class Linear(nn.Linear):
    """Drop-in nn.Linear (same parameters and state dict) with the decode GEMV on CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Read when the layer is built, not per call: a decode step calls ~120 of these, and reading the
        # environment costs microseconds each time.
        self.use_gemv = envs.dense_gemv_kernel() is KernelChoice.NATIVE
        self.gemv_threads = envs.quant_threads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.use_gemv and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == torch.float32
                and x.device.type == "cpu" and self.weight.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and load_extension(SOURCE)):
            return torch.ops.pernode.dense_gemv(x, self.weight, self.bias, self.gemv_threads)
        return F.linear(x, self.weight, self.bias)


def build_kernels():
    """Build the kernel now (e.g. from the Makefile) and return its build folder, or None if it failed."""
    return build_path(SOURCE)
