"""Builds and loads csrc/decoder_stack.cpp: every decoder layer of a decode-sized step as one C++ call, over the
same kernels the per-op path dispatches to one by one (models/fused_decode.py lays out its operands)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pernode.serve.kernels.jit import build_path, load_extension

SOURCE = "decoder_stack.cpp"
PROJECTIONS_PER_LAYER = 4  # qkv, o, gate_up, down: the order of the op's per-projection lists
INT8_INPUT = 1  # flags of a projection's config (csrc/decoder_stack.cpp)
DENSE_GEMV = 2
INT16_GEMM = 4  # an int4 projection's GEMM takes x as int16 (woq_gemm_int16x)


def load_kernel() -> Callable | None:
    """`torch.ops.pernode.decoder_stack`, building it if needed; None if it can't be built."""
    return torch.ops.pernode.decoder_stack if load_extension(SOURCE) else None


def build_kernels() -> Path | None:
    """Build the kernel now (e.g. from the Makefile) and return its build folder, or None if it failed."""
    return build_path(SOURCE)
