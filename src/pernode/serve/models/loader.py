"""Build a model the way the engine serves it: on the meta device, quantized layers swapped in where the checkpoint
says so, then filled from the checkpoint's tensors (no random init, no float copy of a quantized weight)."""
from __future__ import annotations

import torch

from pernode.quant_format import schemes_of
from pernode.serve.models.llama import LlamaForCausalLM
from pernode.serve.kernels.sparse_linear import use_sparse_kernels
from pernode.serve.models.registry import ModelSource, resolve_model
from pernode.sparse_format import SparseFormat, decompressed_tensors, sparse_format_of


def build_model(source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                max_positions: int = 4096) -> LlamaForCausalLM:
    qc = source.quantization_config
    sparse = sparse_format_of(qc)
    with torch.device("meta"):
        model = LlamaForCausalLM(source.config, max_positions=max_positions)
        if qc and (sparse is None or qc.get("config_groups")):  # a sparse-only config has no quantization scheme
            model.apply_quantization(*schemes_of(qc))
    model = model.to_empty(device=device).to(dtype)
    model.rotary.reset_cache()
    model.tie_weights()
    tensors = source.iter_tensors(dtype=dtype, device=device)
    if sparse in (SparseFormat.BITMASK, SparseFormat.BITMASK_24):
        tensors = ((n, t.to(device)) for n, t in decompressed_tensors(tensors))
    model.load_weights(tensors)
    if sparse is not None:  # the sparse kernel where it measured faster; a log line says where it is not
        use_sparse_kernels(model, str(qc["sparsity_config"].get("sparsity_structure") or "unstructured"))
    return model.eval()


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, max_positions: int | None = None
               ) -> tuple[LlamaForCausalLM, ModelSource]:
    """(model, source) on the CPU, as the engine builds it: what quantizers, evaluators and benchmarks start from."""
    source = resolve_model(name_or_path)
    return build_model(source, "cpu", dtype, max_positions or 4096), source
