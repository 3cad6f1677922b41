"""Build a model the way the engine serves it: on the meta device, quantized layers swapped in where the checkpoint
says so (a compressed-tensors config, or a GGUF's own Q4_0/Q4_1/Q8_0/Q4_K blocks), then filled from the checkpoint's
tensors (no random init, no float copy of a quantized weight)."""
from __future__ import annotations

import torch
from torch import nn

from pernode.config import GGUF_WEIGHTS
from pernode.quant_format import QuantScheme, schemes_of
from pernode.serve.kernels.quant_linear import QuantLinear, make_quantized_linear
from pernode.serve.kernels.sparse_linear import use_sparse_kernels
from pernode.serve.models.fp32_logits import runs_in_fp32
from pernode.serve.models.llama import FUSED_PROJECTIONS, LlamaForCausalLM
from pernode.serve.models.registry import ModelSource, resolve_model
from pernode.sparse_format import SparseFormat, decompressed_tensors, sparse_format_of

DECODER_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                       "mlp": ("gate_proj", "up_proj", "down_proj")}


def native_gguf_layers(source: ModelSource) -> tuple[dict[str, QuantScheme], frozenset[str]]:
    """(module path of each decoder projection served natively -> its scheme, the HF weight names loaded natively).

    A fused projection (qkv, gate_up) is native only when all its parts share one scheme; files that mix types
    (Q4_K_M keeps some v/down projections in Q6_K) dequantize the others."""
    schemes = source.native_schemes()
    modules: dict[str, QuantScheme] = {}
    native: set[str] = set()
    for i in range(source.config.num_hidden_layers):
        for block, parts in DECODER_PROJECTIONS.items():
            fused: dict[str, list[str]] = {}
            for part in parts:
                target = FUSED_PROJECTIONS.get(part, (part, 0))[0]
                fused.setdefault(target, []).append(f"model.layers.{i}.{block}.{part}.weight")
            for target, names in fused.items():
                found = {schemes.get(name) for name in names}
                if len(found) == 1 and None not in found:
                    modules[f"layers.{i}.{block}.{target}"] = found.pop()
                    native.update(names)
    return modules, frozenset(native)


def _swap_in_quantized(model: nn.Module, modules: dict[str, QuantScheme]) -> None:
    for path, scheme in modules.items():
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, make_quantized_linear(getattr(parent, attr), scheme, path))


def build_model(source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                max_positions: int = 4096, gguf_weights: str = "float") -> LlamaForCausalLM:
    """The model on `device` in `dtype`; with gguf_weights="native" a GGUF's quantized decoder weights stay in
    their own format (int4/int8 kernels), "float" dequantizes them to `dtype`."""
    if gguf_weights not in GGUF_WEIGHTS:
        raise ValueError(f"gguf_weights={gguf_weights!r} is not supported: allowed {', '.join(GGUF_WEIGHTS)}")
    native_modules, native_names = ({}, frozenset())
    if gguf_weights == "native" and source.format == "gguf":
        native_modules, native_names = native_gguf_layers(source)
    qc = source.quantization_config
    sparse = sparse_format_of(qc)
    with torch.device("meta"):
        model = LlamaForCausalLM(source.config, max_positions=max_positions)
        if qc and (sparse is None or qc.get("config_groups")):  # a sparse-only config has no quantization scheme
            model.apply_quantization(*schemes_of(qc))
        _swap_in_quantized(model, native_modules)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.reset_cache()
    model.tie_weights()
    tensors = source.iter_tensors(dtype=dtype, device=device, native=native_names)
    if sparse in (SparseFormat.BITMASK, SparseFormat.BITMASK_24):
        tensors = ((n, t.to(device)) for n, t in decompressed_tensors(tensors))
    model.load_weights(tensors)
    if gguf_weights == "native" and source.format == "gguf":
        _serve_native_lm_head(model, source, device)
    if sparse is not None:  # the sparse kernel where it measured faster; a log line says where it is not
        use_sparse_kernels(model, str(qc["sparsity_config"].get("sparsity_structure") or "unstructured"))
    for module in model.modules():  # measured once per layer shape on this CPU, then read from the cache file
        if isinstance(module, QuantLinear):  # the lm_head sees fp32 rows where it can (fp32_logits.py)
            module.calibrate(torch.float32 if module is model.lm_head and runs_in_fp32(module) else dtype)
    return model.eval()


def _serve_native_lm_head(model: LlamaForCausalLM, source: ModelSource, device: torch.device | str) -> None:
    """The output projection from the GGUF's own blocks (Q8_0 for the default model): decode streams it every
    step, and int8 is a quarter of fp32's bytes. A tied embedding stays a float table for its row lookups, so the
    two stop sharing storage; nothing re-ties them after this (tie_weights runs only while building)."""
    head = source.native_lm_head(device)
    if head is None:
        return
    scheme, pieces = head
    config = source.config
    if scheme.group_size and config.hidden_size % scheme.group_size:
        return
    layer = QuantLinear(config.hidden_size, config.vocab_size, scheme, device=device)
    layer.load_state_dict(pieces)
    layer.post_load()
    model.lm_head = layer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, max_positions: int | None = None,
               gguf_weights: str = "float") -> tuple[LlamaForCausalLM, ModelSource]:
    """(model, source) on the CPU, as the engine builds it: what quantizers, evaluators and benchmarks start from.
    GGUF weights are dequantized by default (quantizers start from float weights); "native" keeps them."""
    source = resolve_model(name_or_path)
    return build_model(source, "cpu", dtype, max_positions or 4096, gguf_weights), source
