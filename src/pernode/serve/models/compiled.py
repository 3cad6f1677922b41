"""The decoder layers through torch.compile: dynamo captures a layer, inductor fuses its small ops, and on CUDA
decode steps replay CUDA graphs. PyTorch 2 (Ansel et al., ASPLOS 2024, doi 10.1145/3620665.3640366).

Shapes are dynamic (one graph serves every token count), the C++ ops stay single calls inside the graph (their
shape functions are in kernels/op_fakes.py), and inductor's cache lives in pernode's cache folder, so a second
start reuses the first one's compiled code. A warm-up compiles the two graphs a server needs (a decode-sized step
and a prefill-sized one) before the first request.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from pernode import envs
from pernode.serve.kernels.attention_metadata import AttentionMetadata, contiguous_block_tables
from pernode.serve.kernels.op_fakes import FAKES, register_fake_ops
from pernode.serve.kernels.quant_linear import SOURCE as QUANT_SOURCE
from pernode.serve.models.llama import LlamaForCausalLM

log = logging.getLogger("pernode.serve.models")


def use_compile_cache() -> str:
    """Point inductor's cache (compiled kernels, FX graphs) at pernode's folder (PERNODE_COMPILE_CACHE). Set, not
    defaulted: torch writes its own /tmp default into TORCHINDUCTOR_CACHE_DIR the first time anything asks for
    the folder (loading the C++ kernels does), and inductor reads the variable at each compile."""
    folder = str(envs.compile_cache_dir())
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def compile_mode(device: torch.device) -> str | None:
    """CUDA: "reduce-overhead" records a CUDA graph per decode shape, removing the launch cost that dominates a
    small step. CPU: the default mode (there is no launch cost to remove; fusion is the gain)."""
    return "reduce-overhead" if device.type == "cuda" else None


def compile_model(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    """Compile each decoder layer in place and return the model. The layers share one code object, so dynamo
    captures one graph per shape class and reuses it for every layer (their weights are the graph's inputs):
    compiling costs one layer's worth, not the depth's. Not compiled yet: the first call of each shape class
    compiles (see `warm_up`)."""
    cache = use_compile_cache()
    # the weight-only quantized GEMV only where the model has quantized layers: building it costs minutes
    quantized = any(hasattr(m, "post_load") for m in model.modules())
    ops = register_fake_ops(tuple(src for src in FAKES if quantized or src != QUANT_SOURCE))
    log.info("torch.compile: inductor, dynamic shapes, mode %s, cache %s, C++ ops in the graph: %s",
             compile_mode(device) or "default", cache, ", ".join(ops) or "none")
    for layer in model.layers:
        layer.compile(dynamic=True, mode=compile_mode(device))
    return model


def is_compiled(model: LlamaForCausalLM) -> bool:
    return all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.layers)


@torch.inference_mode()
def warm_up(model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
            device: torch.device, token_counts: tuple[int, ...] = (1, 3, 24)) -> float:
    """Run the compiled forward at a few token counts (one decode row, a few, a prefill chunk) so compiling
    happens now, not in a user's first request. It writes K/V into the first blocks of the engine's own (still
    empty) caches: the same tensors the steps pass keep the graphs' guards, and the slots are overwritten before
    any request reads them. Returns the seconds it took."""
    started = time.perf_counter()
    caches = kv_caches
    for n in token_counts:
        tables = contiguous_block_tables(1, n, block_size)
        meta = AttentionMetadata.build(tables, [0], [n], block_size, device)
        ids = torch.zeros(n, dtype=torch.long, device=device)
        positions = torch.arange(n, device=device)
        model(ids, positions, caches, meta)
    return time.perf_counter() - started
