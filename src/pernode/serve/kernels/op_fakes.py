"""Shape functions ("fake" implementations) of the C++ ops, so torch.compile traces through them.

Dynamo and inductor run a graph on fake tensors first to learn its shapes; an op without a fake implementation
breaks the graph there. Each fake returns empty tensors of the shape and dtype the C++ op returns, and the op
itself stays one opaque call inside the compiled graph. Registered only for the kernels that built.
"""
from __future__ import annotations

import torch

from pernode.serve.kernels.jit import load_extension


def _rms_norm(x, weight, eps):
    return torch.empty_like(x)


def _rotary_embedding_(qkv, positions, cos, sin, num_heads, head_dim):
    return None


def _add_rms_norm(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _silu_and_mul(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


def _paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, k_scale=None,
                     v_scale=None):
    return torch.empty_like(query)


def _dense_gemv(x, weight, bias, num_threads=0):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _woq_linear(x, weight, scale, zero_term, bits, group_size, num_threads=0, quantize_input=False):
    # bf16 x gives bf16 y; any other x gives fp32 y
    return x.new_empty((x.shape[0], weight.shape[0]),
                       dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)


def _woq_gemm(x, weight, scale, zero_term, bits, group_size):
    return x.new_empty((x.shape[0], weight.shape[0]))  # in x's dtype, unlike woq_linear


def _woq_panel_gemm(x, weight, scale, zero_term, group_size, num_threads=0):
    return x.new_empty((x.shape[0], weight.shape[0]))  # in x's dtype (woq_gemm_int16x too: the same signature)


def _sparse_gemv(x, values, bitmask, row_offsets, bias, num_threads):
    return x.new_empty((x.shape[0], bitmask.shape[0]))


FAKES = {
    "layer_ops.cpp": {"rms_norm": _rms_norm, "rotary_embedding_": _rotary_embedding_,
                      "add_rms_norm": _add_rms_norm, "silu_and_mul": _silu_and_mul},
    "paged_attention.cpp": {"paged_attention": _paged_attention},
    "dense_gemv.cpp": {"dense_gemv": _dense_gemv},
    "sparse_gemv.cpp": {"sparse_gemv": _sparse_gemv},
    "quant_linear.cpp": {"woq_linear": _woq_linear, "woq_gemm": _woq_gemm,
                         "woq_panel_gemm": _woq_panel_gemm, "woq_gemm_int16x": _woq_panel_gemm},
}


_REGISTERED: set[str] = set()


def register_fake_ops(sources=tuple(FAKES)) -> tuple[str, ...]:
    """Load the kernels in `sources` (building them if needed) and register the fakes of those that load, once per
    process; returns every op covered so far."""
    for source in sources:
        if source in _REGISTERED or not load_extension(source):
            continue
        for name, fn in FAKES[source].items():
            torch.library.register_fake(f"pernode::{name}")(fn)
        _REGISTERED.add(source)
    return tuple(name for source in FAKES if source in _REGISTERED for name in FAKES[source])
